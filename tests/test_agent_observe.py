"""The agent's eyes: pyusb over the simulated bus, the watcher's events, usage, sleep detection."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import usb.core

from agent.config import load
from agent.power import SuspendDetector
from agent.probe.simulated import BusFile, SimulatedBackend, parse_bus
from agent.probe.usb import Prober, kind_from_interfaces, max_speed_from_bcd, port_path, probe
from agent.runner import Observer
from agent.usage import holders
from agent.watch import Watcher
from tests.builder import CAMERA, SPEAKER, write_bus


def test_pyusb_reads_the_simulated_bus(tmp_path: Path) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER, {**CAMERA, "serial": "X", "kind": "microphone", "port": "2-1", "pid": "0001"})
    backend = SimulatedBackend(BusFile(str(bus)))
    devs = list(usb.core.find(find_all=True, backend=backend))
    assert [d.idVendor for d in devs] == [0x046D, 0x0B0E, 0x046D]
    assert usb.util.get_string(devs[0], devs[0].iProduct) == "Logitech Webcam C930e"
    got = probe(backend)
    assert [(d["key"], d["kind"], d["port"], d["speed"], d["max_speed"]) for d in got] == [
        ("046d:0843:A1B2C3D4", "camera", "1-2", "high", "high"),
        ("0b0e:2456@1-3.1", "speakerphone", "1-3.1", "full", "full"),
        ("046d:0001:X", "microphone", "2-1", "high", "high"),
    ]
    assert got[0]["firmware"] == "0.13" and got[0]["vendor"] == "Logitech"


def test_unplugged_device_raises_enodev(tmp_path: Path) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA)
    backend = SimulatedBackend(BusFile(str(bus)))
    [dev] = list(usb.core.find(find_all=True, backend=backend))
    write_bus(bus)
    backend.bus.reload()
    with pytest.raises(usb.core.USBError) as ei:
        usb.util.get_langids(dev)
    assert ei.value.errno == errno.ENODEV


def test_kind_rules_and_helpers() -> None:
    assert kind_from_interfaces([(0x0E, 1, []), (0x01, 2, [0x82])]) == "camera"
    assert kind_from_interfaces([(0x01, 1, []), (0x01, 2, [0x01]), (0x01, 2, [0x82])]) == "speakerphone"
    assert kind_from_interfaces([(0x01, 2, [0x01])]) == "speaker"
    assert kind_from_interfaces([(0x01, 2, [0x81])]) == "microphone"
    assert kind_from_interfaces([(0x03, 0, [0x81])]) == "other"
    # async playback: OUT data endpoint plus an IN feedback endpoint (iso, usage type feedback)
    assert kind_from_interfaces([(0x01, 2, [(0x01, 0x05), (0x81, 0x11)])]) == "speaker"
    assert kind_from_interfaces([(0x01, 2, [(0x01, 0x05)]), (0x01, 2, [(0x82, 0x05)])]) == "speakerphone"
    assert [max_speed_from_bcd(b) for b in (0x0110, 0x0200, 0x0300, 0x0320, 0)] == [
        "full", "high", "super", "super_plus", None]
    assert port_path(1, (2, 3, 1)) == "1-2.3.1" and port_path(None, ()) is None


def test_invalid_bus_file_keeps_last_good_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA)
    bf = BusFile(str(bus))
    assert len(bf.devices) == 1
    bus.write_text('{"devices": [{"vid": "04')  # half-written
    assert not bf.reload() and len(bf.devices) == 1
    bus.write_text('{"devices": [{"vid": "zz"}]}  ')
    assert not bf.reload() and len(bf.devices) == 1
    assert sum("invalid" in r.message for r in caplog.records) == 2
    with pytest.raises(ValueError, match="port"):
        parse_bus({"devices": [{**CAMERA, "port": "nope"}]})


def test_simulated_devices_never_read_the_real_sysfs(tmp_path: Path) -> None:
    fake_sys = tmp_path / "sys" / "bus" / "usb" / "devices" / "1-2"
    fake_sys.mkdir(parents=True)
    (fake_sys / "serial").write_text("REAL-DEVICE\n")
    bus = tmp_path / "bus.json"
    write_bus(bus, {**CAMERA, "serial": None})
    cfg = load(env={}, usb_backend="simulated", simulated_bus=str(bus), sysfs_root=str(tmp_path / "sys"))
    [d] = Observer(cfg).look().devices
    assert d["key"] == "046d:0843@1-2" and d["serial"] is None


def test_descriptor_strings_and_numbers_read_back_as_a_device_reports_them(tmp_path: Path) -> None:
    """A NUL-padded serial (common on cheap devices) gives a key the protocol accepts; firmware is BCD;
    a SuperSpeed device's best speed is at least what it negotiated."""
    from common.protocol import check_device

    bus = tmp_path / "bus.json"
    write_bus(bus, {**CAMERA, "serial": "ABC\u0000\u0000", "product": "Cam\u0007 X ", "firmware": "10.00"},
              {**{k: v for k, v in SPEAKER.items() if k != "max_speed"}, "port": "2-1", "speed": "super"})
    cam, spk = sorted(Prober(SimulatedBackend(BusFile(str(bus)))).probe(), key=lambda d: d["port"])
    assert (cam["key"], cam["serial"], cam["product"], cam["firmware"]) == ("046d:0843:ABC", "ABC", "Cam X", "10.00")
    check_device(cam, "device")  # valid on the wire
    assert (spk["speed"], spk["max_speed"]) == ("super", "super")


def test_two_devices_reporting_one_serial_are_told_apart_by_their_port(tmp_path: Path) -> None:
    """Two of one model with one serial (cheap devices often do) made a fake move at every look: the
    first one 'detached' and the other 'attached on another port' — a handling mark."""
    room = Room(tmp_path, {**CAMERA, "port": "1-4"})
    twin = {**CAMERA, "port": "1-2"}
    ev = room.set({**CAMERA, "port": "1-4"}, twin)  # the one already there keeps its key, the newcomer its port's
    assert kinds(ev) == [("device.attached", "046d:0843@1-2")]
    assert room.set({**CAMERA, "port": "1-4"}, twin) == []  # and nothing moves while both stay
    assert kinds(room.set(twin)) == [("device.detached", "046d:0843:A1B2C3D4")]  # the first one goes...
    assert kinds(room.set(twin)) == []  # ...and the other, keyed by its port, stays as it is


def test_hung_device_keeps_its_identity(tmp_path: Path) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA)
    prober = Prober(SimulatedBackend(BusFile(str(bus))))
    assert prober.probe()[0]["key"] == "046d:0843:A1B2C3D4"
    write_bus(bus, {**CAMERA, "unresponsive": True})
    [d] = prober.probe()
    assert d["key"] == "046d:0843:A1B2C3D4" and prober.failures == {"1-2": -110}


class Room:
    """The simulated bus plus an observer and a watcher, as the agent runs them."""

    def __init__(self, tmp_path: Path, *devices: dict[str, Any]) -> None:
        self.bus = tmp_path / "bus.json"
        write_bus(self.bus, *devices)
        cfg = load(env={}, usb_backend="simulated", simulated_bus=str(self.bus), state_dir=str(tmp_path))
        self.observer = Observer(cfg)
        self.watcher = Watcher(recover_quiet_s=600)
        first = self.observer.look()
        self.watcher.start(first.devices, first.usage)

    def set(self, *devices: dict[str, Any]) -> list[dict[str, Any]]:
        write_bus(self.bus, *devices)
        events, _ = self.watcher.step(self.observer.look())
        return events


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["device"]["key"]) for e in events]


def test_plug_unplug_move_and_slow_down(tmp_path: Path) -> None:
    room = Room(tmp_path, CAMERA, SPEAKER)
    cam, spk = "046d:0843:A1B2C3D4", "0b0e:2456@1-3.1"
    assert room.set(CAMERA, SPEAKER) == []
    ev = room.set(SPEAKER)
    assert kinds(ev) == [("device.detached", cam)]
    assert ev[0]["context"] == {"in_use": False, "users": [], "meeting": False}
    assert kinds(room.set(CAMERA, SPEAKER)) == [("device.attached", cam)]
    ev = room.set({**CAMERA, "port": "1-4"}, SPEAKER)  # moved between two looks
    assert kinds(ev) == [("device.detached", cam), ("device.attached", cam)]
    assert ev[0]["device"]["port"] == "1-2" and ev[1]["device"]["port"] == "1-4"
    ev = room.set({**CAMERA, "port": "1-4"}, {**SPEAKER, "port": "1-5"})  # no serial: a new key
    assert kinds(ev) == [("device.detached", spk), ("device.attached", "0b0e:2456@1-5")]
    ev = room.set({**CAMERA, "port": "1-4", "speed": "full"}, {**SPEAKER, "port": "1-5"})
    assert [(e["type"], e["error"]["code"]) for e in ev] == [("device.error", "usb.speed_degraded")]
    assert room.set({**CAMERA, "port": "1-4", "speed": "full"}, {**SPEAKER, "port": "1-5"}) == []
    ev = room.set({**CAMERA, "port": "1-4"}, {**SPEAKER, "port": "1-5"})
    assert [(e["type"], e["error"]["code"]) for e in ev] == [("device.recovered", "usb.speed_degraded")]


def test_usage_changes_and_detach_in_a_meeting(tmp_path: Path) -> None:
    room = Room(tmp_path, CAMERA)
    in_call = {**CAMERA, "in_use": True, "users": ["zoom"], "meeting": True}
    ev = room.set(in_call)
    assert [(e["type"], e["context"]) for e in ev] == [
        ("device.usage", {"in_use": True, "users": ["zoom"], "meeting": True})]
    ev = room.set()
    assert ev[0]["type"] == "device.detached"
    assert ev[0]["context"] == {"in_use": True, "users": ["zoom"], "meeting": True}


def test_self_reported_errors_and_recovery(tmp_path: Path) -> None:
    room = Room(tmp_path, CAMERA)
    broken = {**CAMERA, "errors": [{"code": "video.stream_error", "message": "stream stalled", "errno": -71}]}
    ev = room.set(broken)
    assert [(e["type"], e["error"]["code"], e["error"]["errno"]) for e in ev] == [
        ("device.error", "video.stream_error", -71)]
    assert room.set(broken) == []  # a condition that persists is reported once
    ev = room.set(CAMERA)
    assert [(e["type"], e["error"]["code"]) for e in ev] == [("device.recovered", "video.stream_error")]
    assert room.watcher.errors_total["046d:0843:A1B2C3D4"] == 1


def test_hung_device_is_a_timeout(tmp_path: Path) -> None:
    room = Room(tmp_path, CAMERA)
    ev = room.set({**CAMERA, "unresponsive": True})
    assert [(e["type"], e["error"]["code"], e["error"]["errno"]) for e in ev] == [
        ("device.error", "usb.timeout", -110)]
    assert [e["type"] for e in room.set(CAMERA)] == ["device.recovered"]


def test_kernel_signals_are_attributed_by_port(tmp_path: Path) -> None:
    from agent.signals.kmsg import parse_line
    from agent.watch import Tick

    room = Room(tmp_path, CAMERA, SPEAKER)
    t: Tick = room.observer.look()
    t.signals = [s for s in (parse_line(line, i) for i, line in enumerate([
        "[ 1.0] usb 1-3.1: 1:1: usb_set_interface failed (-71)",
        "[ 1.1] usb 1-3.1: 1:1: usb_set_interface failed (-71)",
        "[ 1.2] uvcvideo: Failed to query (GET_CUR) UVC control 1 on unit 3: -110 (exp. 1024).",
        "[ 1.3] usb 1-2: reset high-speed USB device number 4 using xhci_hcd",
        "[ 1.4] usb 9-9: device descriptor read/64, error -71",
    ])) if s is not None]
    ev, _ = room.watcher.step(t)
    assert [(e["device"]["key"], e["error"]["code"], e["error"]["count"]) for e in ev] == [
        ("0b0e:2456@1-3.1", "audio.stream_error", 2),
        ("046d:0843:A1B2C3D4", "video.control_error", 1),
        ("046d:0843:A1B2C3D4", "usb.reset", 1),
    ]
    assert ev[0]["error"]["message"] == "usb 1-3.1: 1:1: usb_set_interface failed (-71)"
    tel = {d["key"]: d for d in room.watcher.telemetry_devices()}
    assert tel["046d:0843:A1B2C3D4"]["resets_total"] == 1 and tel["046d:0843:A1B2C3D4"]["errors_total"] == 1


def test_a_kernel_error_recovers_after_ten_minutes_present_without_it(tmp_path: Path) -> None:
    """PROTOCOL 1.1: an error with no "cleared" signal of its own gets device.recovered after 10 min
    present without that code; time away does not count."""
    from agent.signals.kmsg import parse_line
    from agent.watch import Tick

    room = Room(tmp_path, CAMERA, SPEAKER)
    spk = "0b0e:2456@1-3.1"

    def tick(now: float, *devices: dict[str, Any], lines: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        write_bus(room.bus, *devices)
        t: Tick = room.observer.look()
        t.now = now
        t.signals = [s for s in (parse_line(x, i) for i, x in enumerate(lines)) if s is not None]
        ev, _ = room.watcher.step(t)
        return [(e["type"], e["device"]["key"]) for e in ev]

    err = ("[ 1.0] usb 1-3.1: 1:1: usb_set_interface failed (-71)",)
    assert tick(0, CAMERA, SPEAKER, lines=err) == [("device.error", spk)]
    assert tick(60, CAMERA) == [("device.detached", spk)]  # away from 60 s...
    assert tick(590, CAMERA, SPEAKER) == [("device.attached", spk)]  # ...back at 590 s
    assert tick(600, CAMERA, SPEAKER) == []  # 10 min after the error, but only 10 s present
    assert tick(1189, CAMERA, SPEAKER) == []
    assert tick(1190, CAMERA, SPEAKER) == [("device.recovered", spk)]  # 10 min present without it
    assert tick(1800, CAMERA, SPEAKER, lines=err) == [("device.error", spk)]
    assert tick(2399, CAMERA, SPEAKER) == []
    assert tick(2400, CAMERA, SPEAKER) == [("device.recovered", spk)]  # present throughout: 10 min after it


def test_usage_from_a_process_really_holding_the_node(tmp_path: Path) -> None:
    node = tmp_path / "video7"
    node.write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(node)!r}); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not holders([str(node)]):
            time.sleep(0.05)
        found = holders([str(node)])
        assert list(found) == [str(node)] and found[str(node)][0].startswith("python")
        room = Room(tmp_path, {**CAMERA, "nodes": [str(node)]})
        assert room.watcher.usage["046d:0843:A1B2C3D4"].in_use
        node.unlink()  # the link now reads "... (deleted)"
        ev = room.set()
        assert ev[0]["type"] == "device.detached" and ev[0]["context"]["in_use"] is True
        assert ev[0]["context"]["users"][0].startswith("python")
    finally:
        holder.kill()
        holder.wait()


def test_suspend_detector() -> None:
    clock = {"mono": 100.0, "boot": 100.0}
    det = SuspendDetector(threshold_s=5, monotonic=lambda: clock["mono"], boottime=lambda: clock["boot"])
    assert det.tick() is None
    clock["mono"] += 2
    clock["boot"] += 2
    assert det.tick() is None
    clock["mono"] += 2
    clock["boot"] += 3602  # an hour asleep
    assert det.tick() == pytest.approx(3600)
    clock["mono"] += 2
    clock["boot"] += 6
    assert det.tick() is None  # 4 s of drift is below the threshold
    assert SuspendDetector(boottime=lambda: None).tick() is None


def test_logind_prepare_for_sleep_from_dbus_monitor() -> None:
    from agent.power import parse_prepare_for_sleep

    data = Path(__file__).parent / "data" / "dbus-monitor-sleep.txt"
    assert list(parse_prepare_for_sleep(data.read_text().splitlines())) == [True, False]
    assert list(parse_prepare_for_sleep(["member=PrepareForSleep", "garbage", "   boolean false"])) == [False]
