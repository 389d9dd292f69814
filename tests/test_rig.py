"""The real agent on a real Linux kernel (QEMU rig, tests/rig): a gadget UVC camera and a UAC2
speakerphone are enumerated by the guest's own kernel; the agent inside the guest publishes to
a Mosquitto on this host; every assertion is on what reached the broker.

The idle self-test's five measuring cases run in the same guest against the kernel's own test
drivers (vivid, snd-aloop), since USB/IP here does not carry the gadgets' streams
(docs/self-test.md); their assertions are on the wire events the agent's self-test produced.

The one-command install is proven here too: the guest, with no Pantau of its own (the 9p-shared
checkout is not used), runs the install line the collector gives an operator against a collector and
a Mosquitto with the dynamic security plugin on this host; the installed agent's inventory reaches
the collector, and once the agent is disabled nothing it has to say gets through.

When the machine cannot run the rig (not root, no QEMU, no package mirror), the tests are
skipped with one line saying why.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import enroll
from collector.subscriber import Subscriber
from collector.web.enroll import commands as enroll_commands
from common.config import parse_broker
from tests.conftest import Mosquitto
from tests.enroll_helpers import ADMIN, ADMIN_PW, Client, enroll_site
from tests.procs import Recorder, wait_until
from tests.rig.rig import Gadget, Rig, RigUnavailable, StandIns, prepare

pytestmark = pytest.mark.rig
AGENT = "rig-room"


class Room:
    def __init__(self, rig: Rig, broker: Mosquitto) -> None:
        self.rig, self.broker = rig, broker
        self.camera = Gadget(rig, "camera", "usbip-vudc.0", "1209:0001", "PANTAU-CAM-1")
        self.speaker = Gadget(rig, "speaker", "usbip-vudc.1", "1209:0002", "PANTAU-SPK-1")
        self.rec = Recorder(broker.port, client_id="rig-recorder")

    def events(self, etype: str, key: str, after: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.rec.events(etype)[after:] if e.get("device", {}).get("key") == key]


@pytest.fixture(scope="session")
def guest() -> Iterator[Rig]:
    """The one booted guest every rig test shares."""
    try:
        cache = prepare()
    except RigUnavailable as exc:
        pytest.skip(f"USB rig not run: {exc}")
    work = Path(tempfile.mkdtemp(prefix="pantau-rig-"))
    rig = Rig(cache, work)
    print(f"\nrig: guest booted in {rig.booted_s:.1f} s")
    try:
        yield rig
    finally:
        try:
            log = rig.sh("cat /tmp/agent.log /tmp/uvc.log 2>/dev/null | tail -40", check=False)
            (work / "guest-logs.txt").write_text(log)
        except Exception:
            pass
        rig.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def room(guest: Rig) -> Iterator[Room]:
    rig = guest
    t0 = time.monotonic()
    broker = Mosquitto().start()
    try:
        rig.sh("sh /pantau/tests/rig/gadgets.sh camera && sh /pantau/tests/rig/gadgets.sh speaker")
        rig.sh("echo ok > /tmp/uvc-mode")
        rig.spawn("uvc", "python3 -u /pantau/tests/rig/uvc_responder.py")
        rig.sh("for i in $(seq 50); do grep -q subscribed /tmp/uvc.log && exit 0; sleep 0.1; done; exit 1")
        rig.sh("usbipd --device -D")
        r = Room(rig, broker)
        r.camera.plug()
        r.speaker.plug()
        wait_until(lambda: r.camera.nodes() and any("pcmC" in n for n in r.speaker.nodes()), 40, interval=0.2,
                   what="the gadgets' device nodes")
        rig.spawn("agent", "python3 -m agent.cli run", env={
            "PYTHONPATH": "/pantau:/opt/pantau-py", "PYTHONDONTWRITEBYTECODE": "1", "PANTAU_AGENT_ID": AGENT,
            "PANTAU_BROKER": f"mqtt://10.0.2.2:{broker.port}", "PANTAU_STATE_DIR": "/tmp/agent-state",
            "PANTAU_KERNEL_LOG": "/dev/kmsg", "PANTAU_POLL_S": "2", "PANTAU_TELEMETRY_S": "5",
            "PANTAU_USB_BACKEND": "libusb", "PANTAU_RECONNECT_MAX_S": "2",
            # USB/IP here cannot carry the gadgets' streams (docs/self-test.md): streaming the camera
            # ends with the link dropped and the camera detached, which would break the tests below
            "PANTAU_SELF_TEST": "off"})
        wait_until(lambda: r.rec.of("inventory"), 90, what="the agent's first inventory")
        print(f"\nrig: gadgets and agent ready in {time.monotonic() - t0:.1f} s")
        yield r
    finally:
        rig.kill("agent")
        broker.close()


@pytest.fixture
def camera(room: Room) -> Gadget:
    return room.camera


@pytest.fixture
def speaker(room: Room) -> Gadget:
    return room.speaker


def test_inventory_lists_camera_and_speakerphone(room: Room) -> None:
    inv = wait_until(lambda: [i for i in room.rec.of("inventory") if len(i["devices"]) >= 2], 30)[-1]
    devices = {d["key"]: d for d in inv["devices"]}
    cam, spk = devices[room.camera.key], devices[room.speaker.key]
    assert (cam["kind"], cam["vid"], cam["pid"], cam["serial"]) == ("camera", "1209", "0001", "PANTAU-CAM-1")
    assert (spk["kind"], spk["vid"], spk["pid"], spk["serial"]) == ("speakerphone", "1209", "0002", "PANTAU-SPK-1")
    assert cam["port"] == room.camera.usb_path() and spk["port"] == room.speaker.usb_path()
    assert cam["speed"] == spk["speed"] == "high"
    assert cam["product"] == "Pantau Rig Camera" and cam["vendor"] == "Pantau Rig"


def test_speakerphone_held_by_a_meeting_app(room: Room, speaker: Gadget) -> None:
    node = speaker.open("zoom")  # the host-side ALSA PCM node snd-usb-audio created
    assert node.startswith("/dev/snd/pcmC")
    ev = wait_until(lambda: [e for e in room.events("device.usage", speaker.key) if e["context"]["in_use"]], 15)
    assert "zoom" in ev[-1]["context"]["users"]
    speaker.close_holder()
    wait_until(lambda: [e for e in room.events("device.usage", speaker.key) if not e["context"]["in_use"]], 15)


def test_unplug_and_replug(room: Room) -> None:
    key = room.camera.key
    n_det, n_att = len(room.events("device.detached", key)), len(room.events("device.attached", key))
    t = time.monotonic()
    room.camera.unplug()
    wait_until(lambda: len(room.events("device.detached", key)) > n_det, 30, interval=0.05)
    detach_s = time.monotonic() - t
    t = time.monotonic()
    room.camera.plug()
    wait_until(lambda: len(room.events("device.attached", key)) > n_att, 30, interval=0.05)
    attach_s = time.monotonic() - t
    print(f"\nrig: unplug -> device.detached at the broker in {detach_s:.2f} s; "
          f"replug -> device.attached in {attach_s:.2f} s")
    assert detach_s <= 3.0
    assert "udev monitor running" in room.rig.sh("cat /tmp/agent.log")  # woken by the kernel, not the poll
    ev = room.events("device.detached", key)[-1]
    assert ev["context"]["in_use"] is False and ev["device"]["port"] == room.camera.usb_path()


def test_unplug_while_a_meeting_app_holds_the_camera(room: Room, camera: Gadget) -> None:
    key = camera.key
    wait_until(lambda: camera.nodes(), 30, what="the camera's /dev/video node")
    node = camera.open("zoom")
    assert node.startswith("/dev/video")
    wait_until(lambda: [e for e in room.events("device.usage", key) if e["context"]["in_use"]], 15,
               what="device.usage in_use")
    n = len(room.events("device.detached", key))
    camera.unplug()
    ev = wait_until(lambda: room.events("device.detached", key)[n:], 30)[0]
    assert ev["context"]["in_use"] is True and "zoom" in ev["context"]["users"]
    camera.close_holder()
    camera.plug()
    wait_until(lambda: camera.nodes(), 30)


def test_stalled_camera_errors_come_from_the_kernel(room: Room, camera: Gadget) -> None:
    key = camera.key
    n = len(room.events("device.error", key))
    try:
        camera.break_("stall")
        errors = wait_until(lambda: [e for e in room.events("device.error", key)[n:]
                                     if e["error"]["code"] in ("video.control_error", "video.stream_error")], 30)
        time.sleep(2.0)
        errors = [e for e in room.events("device.error", key)[n:]]
        codes = {e["error"]["code"] for e in errors}
        # the probe stall (-32) and the failed initialisation (-5) that follows it
        assert {"video.control_error", "video.stream_error"} <= codes
        assert all(e["error"]["source"] == "kernel" and e["device"]["port"] == room.camera.usb_path()
                   for e in errors)
        control = [e for e in errors if e["error"]["code"] == "video.control_error"]
        assert all("Failed to query" in e["error"]["message"] and e["error"]["errno"] == -32 for e in control)
        assert sum(e["error"]["count"] for e in control) >= 2  # unit controls and the probe control
        stream = [e for e in errors if e["error"]["code"] == "video.stream_error"]
        assert stream[0]["error"]["errno"] == -5 and "initialize" in stream[0]["error"]["message"]
    finally:
        camera.break_("ok")
        wait_until(lambda: camera.nodes(), 30)


def test_once_matches_lsusb(room: Room) -> None:
    snap = json.loads(room.rig.sh("cd /pantau && PYTHONPATH=/pantau:/opt/pantau-py PYTHONDONTWRITEBYTECODE=1 "
                                  "PANTAU_AGENT_ID=rig-once python3 -m agent.cli once", timeout=60))
    lsusb = room.rig.sh("lsusb")
    listed = {line.split("ID ")[1][:9] for line in lsusb.splitlines() if "ID " in line}
    non_hubs = {v for v in listed if not v.startswith("1d6b:")}
    assert {f"{d['vid']}:{d['pid']}" for d in snap["devices"]} == non_hubs == {"1209:0001", "1209:0002"}
    for d in snap["devices"]:
        verbose = room.rig.sh(f"lsusb -v -d {d['vid']}:{d['pid']} 2>/dev/null", check=False)
        assert d["serial"] in verbose and d["product"] in verbose
        [line] = [ln for ln in lsusb.splitlines() if f"ID {d['vid']}:{d['pid']}" in ln]
        assert line.startswith(f"Bus {int(d['port'].split('-')[0]):03d} ")  # the same bus as the port path


# --------------------------------------------------------------------------- the one-command install
GUEST_SEES_HOST = "10.0.2.2"  # QEMU user networking: the guest reaches this host's 127.0.0.1 here
# where install.sh puts the agent, its configuration, state and log: tmpfs in the guest for this test,
# so nothing of it lands in the cached guest root (a 9p share of the host's cache) for the next run
INSTALL_PATHS = ("/opt/pantau-agent", "/etc/pantau", "/var/lib/pantau-agent")


@pytest.fixture
def bare_guest(room: Room) -> Iterator[Rig]:
    """The guest with nothing of Pantau outside the 9p share: no module on its Python, no command, no
    install, no configuration. The install paths are fresh tmpfs mounts, removed afterwards."""
    rig = room.rig
    paths = " ".join(INSTALL_PATHS)
    rig.sh(f"cd /tmp && ! python3 -c 'import agent' 2>/dev/null && ! command -v pantau-agent && "
           f"! ls /opt/*/bin/pantau-agent 2>/dev/null && [ -z \"$(ls -A {paths} 2>/dev/null)\" ]")
    scratch = f"{paths} /var/log"
    rig.sh(f"for d in {scratch}; do mkdir -p $d && mount -t tmpfs tmpfs $d || exit 1; done")
    try:
        yield rig
    finally:
        rig.sh("kill -9 $(cat /var/lib/pantau-agent/agent.pid) 2>/dev/null; sleep 0.5; "
               f"for d in {scratch}; do umount $d; done; rmdir {paths}", check=False)


def _outbox(rig: Rig, key: str) -> list[str]:
    """The types of the installed agent's undelivered events about device ``key``."""
    out = rig.sh("python3 -c \"import json, sqlite3; db = sqlite3.connect("
                 "'file:/var/lib/pantau-agent/outbox.sqlite?mode=ro', uri=True); "
                 "[print(json.loads(p)['type']) for t, p in db.execute('SELECT topic, payload FROM outbox') "
                 f"if t.endswith('/events') and json.loads(p).get('device', {{}}).get('key') == '{key}']\"")
    return out.split()


def test_one_command_install_on_a_bare_guest(room: Room, bare_guest: Rig, agent_bundle: str,
                                             tmp_path: Path) -> None:
    """The documented install line, run in a guest with no Pantau, against a collector on this host
    (HTTPS with its own certificate, a Mosquitto with the dynamic security plugin): the installed agent's
    inventory of the gadgets reaches the collector; once the agent is disabled on the collector, nothing
    it has to say gets through."""
    rig = bare_guest
    with enroll_site(tmp_path, agent_bundle, reach_as=GUEST_SEES_HOST) as site:
        store, broker = site["store"], site["broker"]
        sub = Subscriber(site["collector"], parse_broker(broker.url), "pantau-collector", username=ADMIN,
                         password=ADMIN_PW)
        sub.start()
        watcher = Client(broker.url, ADMIN, ADMIN_PW)
        watcher.c.subscribe("pantau/v1/agents/room-1/#", qos=1)
        try:
            token = enroll.new_token(store, "setjen", "r1", 3600, "tester")["token"]
            line = enroll_commands(site["url"], site["fingerprint"], token)["linux"]
            assert line.startswith("curl -fsSLk --pinnedpubkey sha256//") and "| sudo sh -s -- " in line
            # a key other than the collector's stops curl before anything reaches sh
            wrong = rig.call({"cmd": "sh", "timeout": 60, "script": re.sub(r"sha256//\S+", "sha256//" + "A" * 43 + "=",
                                                                           line.split(" | ")[0])})
            assert wrong["rc"] != 0 and wrong["out"] == "", wrong
            # the guest's shell is root and has no sudo; the self-test stays off as for the rig's other
            # agent (USB/IP here cannot carry the gadgets' streams: streaming would detach the camera)
            t0 = time.monotonic()
            out = rig.sh(f"cd /tmp && export PANTAU_SELF_TEST=off && {line.replace('| sudo sh', '| sh')}",
                         timeout=220)
            install_s = time.monotonic() - t0
            assert "enrolled as room-1 (unit setjen, room r1)" in out, out
            pid = rig.sh("cat /var/lib/pantau-agent/agent.pid").strip()
            cmdline = rig.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline")
            assert cmdline.startswith("/opt/pantau-agent/bin/python /opt/pantau-agent/bin/pantau-agent "), cmdline
            where = rig.sh("cd /tmp && /opt/pantau-agent/bin/python -c 'import agent; print(agent.__file__)'")
            assert where.startswith("/opt/pantau-agent/lib/"), where
            assert rig.sh("stat -c %a /etc/pantau/agent.toml").strip() == "600"

            def inventory() -> dict[str, dict[str, Any]]:
                rows = store.query("SELECT inventory FROM agents WHERE agent = 'room-1'")
                return {d["key"]: d for d in json.loads(rows[0]["inventory"] or "[]")} if rows else {}

            t1 = time.monotonic()
            inv = wait_until(lambda: (i := inventory()) and {room.camera.key, room.speaker.key} <= set(i) and i, 90,
                             what="the installed agent's inventory at the collector")
            print(f"\nrig: one-command install in {install_s:.1f} s; its inventory stored by the collector "
                  f"{time.monotonic() - t1:.1f} s later")
            cam, spk = inv[room.camera.key], inv[room.speaker.key]
            assert (cam["kind"], cam["serial"], spk["kind"], spk["serial"]) == \
                ("camera", "PANTAU-CAM-1", "speakerphone", "PANTAU-SPK-1")
            assert cam["port"] == room.camera.usb_path() and spk["port"] == room.speaker.usb_path()

            enroll.disable_agent(store, site["settings"], "room-1", "tester", "PC replaced")
            wait_until(lambda: "not authori" in rig.sh("cat /var/log/pantau-agent.log").lower(), 30,
                       what="the installed agent refused by the broker")
            time.sleep(1.0)  # the broker's will message for the dropped connection
            watcher.got.clear()
            stored = store.query("SELECT count(*) AS n FROM evidence WHERE agent = 'room-1'")[0]["n"]
            # something to say: the speaker unplugged and back (the rig's other agent reports both)
            n_att = len(room.events("device.attached", room.speaker.key))
            room.speaker.unplug()
            room.speaker.plug()
            wait_until(lambda: len(room.events("device.attached", room.speaker.key)) > n_att, 30,
                       what="the replug reported by the rig's other agent")
            # the installed agent saw it too: the events wait in its outbox, undelivered
            held = wait_until(lambda: (t := _outbox(rig, room.speaker.key)) and
                              {"device.detached", "device.attached"} <= set(t) and t, 30,
                              what="the replug in the installed agent's outbox")
            time.sleep(3.0)
            rig.sh(f"kill -0 {pid}")  # still running, retrying: not crashed
            print(f"rig: after the disable, the speaker's {', '.join(held)} held by the agent, none delivered")
            assert watcher.got == []
            assert store.query("SELECT count(*) AS n FROM evidence WHERE agent = 'room-1'")[0]["n"] == stored
        finally:
            watcher.close()
            sub.stop()


# --------------------------------------------------------------------------- the idle self-test
@pytest.fixture(scope="session")
def stand_ins(guest: Rig) -> StandIns:
    return StandIns(guest)


def _outcome(stand_ins: StandIns, events: list[dict[str, Any]], code: str | None) -> dict[str, Any]:
    """The figures of the one device.self_test; a failure also came as a probe device.error."""
    assert [e["type"] for e in events] == ["device.self_test"] + (["device.error"] if code else []), \
        (events, stand_ins.log)
    ctx = events[0]["context"]
    assert (ctx["result"], ctx["code"], ctx["trigger"]) == ("fail" if code else "pass", code, "attach"), ctx
    if code:
        err = events[1]["error"]
        assert (err["code"], err["source"], events[1]["context"]["self_test"]) == (code, "probe", ctx["test"])
        assert err["message"].startswith(f"{ctx['node']}: self-test: ")
    return dict(ctx["figures"])


def test_self_test_camera_live_frames_pass(stand_ins: StandIns) -> None:
    stand_ins.camera("noise")  # every frame new noise, as a live sensor's
    fig = _outcome(stand_ins, stand_ins.self_test("camera", StandIns.VIDEO), None)
    print(f"\nrig self-test, live camera: {fig} ({stand_ins.log})")
    assert (fig["frames"], fig["pairs"], fig["identical_pairs"], fig["error_frames"]) == (5, 4, 0, 0)
    # vivid's smallest webcam size; brightness from the Y bytes of real YUYV frames
    assert (fig["format"], fig["width"], fig["height"], fig["brightness_from"]) == ("YUYV", 320, 180, "yuyv_y")
    assert 0 < fig["first_frame_s"] < 2.0
    assert 16 <= fig["brightness_mean"] <= 235 and fig["brightness_variance"] > 1000


def test_self_test_camera_identical_frames_are_frozen(stand_ins: StandIns) -> None:
    stand_ins.camera("colorbar")  # a still picture and nothing that changes: no OSD clock, no movement
    fig = _outcome(stand_ins, stand_ins.self_test("camera", StandIns.VIDEO), "video.frozen")
    print(f"\nrig self-test, frozen camera: {fig} ({stand_ins.log})")
    assert (fig["frames"], fig["pairs"], fig["identical_pairs"], fig["error_frames"]) == (5, 4, 4, 0)
    assert fig["brightness_variance"] > 1000  # a picture (the bars), not an empty buffer


def test_self_test_camera_without_frames(stand_ins: StandIns) -> None:
    stand_ins.camera("noise", dropped_percent=100)  # streaming starts; vivid returns no buffer
    try:
        events = stand_ins.self_test("camera", StandIns.VIDEO, first_frame_s=2.0)
    finally:
        stand_ins.camera("noise")
    fig = _outcome(stand_ins, events, "video.no_frames")
    print(f"\nrig self-test, camera without frames: {fig} ({stand_ins.log})")
    assert (fig["frames"], fig["error_frames"], fig["first_frame_s"], fig["format"]) == (0, 0, None, "YUYV")
    assert events[0]["context"]["duration_s"] >= 2.0  # the whole allowance was waited for


def test_self_test_microphone_noise_passes(stand_ins: StandIns) -> None:
    stand_ins.play("/dev/urandom")
    try:
        events = stand_ins.self_test("microphone", StandIns.MIC)
        assert stand_ins.playing()  # the noise ran through the whole capture
    finally:
        stand_ins.stop_playing()
    fig = _outcome(stand_ins, events, None)
    print(f"\nrig self-test, microphone hearing noise: {fig} ({stand_ins.log})")
    assert (fig["format"], fig["rate"], fig["channels"]) == ("S16_LE", 48000, 1)
    assert fig["samples"] >= 48000 and fig["seconds"] >= 1.0
    # what was played arrived: uniform random samples have an RMS of 1/sqrt(3) of full scale (-4.8 dBFS)
    assert 0.5 < fig["rms"] < 0.65 and fig["peak"] > 0.9 and fig["zero_fraction"] < 0.01


def test_self_test_microphone_digital_silence(stand_ins: StandIns) -> None:
    stand_ins.play("/dev/zero")
    try:
        events = stand_ins.self_test("microphone", StandIns.MIC)
        assert stand_ins.playing()
    finally:
        stand_ins.stop_playing()
    fig = _outcome(stand_ins, events, "audio.no_signal")
    print(f"\nrig self-test, microphone hearing digital silence: {fig} ({stand_ins.log})")
    assert "digital silence" in events[1]["error"]["message"]
    # samples arrived — silence, not absence
    assert fig["samples"] >= 48000 and (fig["zero_fraction"], fig["peak"], fig["rms"]) == (1.0, 0.0, 0.0)
    assert fig["rms_dbfs"] is None and fig["peak_dbfs"] is None
