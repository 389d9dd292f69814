"""Kernel log lines (real, see tests/data/kernel/SOURCES.md) -> protocol error codes and ports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.signals.kmsg import parse_lines
from tests.conftest import run_cli

DATA = Path(__file__).parent / "data" / "kernel"


def sigs(name: str) -> list[tuple[int, str | None, str, int | None]]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [(s.line_no, s.port, s.code, s.errno) for s in parse_lines(fh)]


def test_enumeration_failures() -> None:
    assert sigs("enumeration-failure.dmesg") == [
        (1, "2-3", "usb.new_device", None),
        (2, "2-3", "usb.enumeration_failed", -71),
        (3, "2-3", "usb.enumeration_failed", None),
        (4, "2-3", "usb.enumeration_failed", None),
        (5, "2-3", "usb.enumeration_failed", -71),
        (7, "2-3", "usb.enumeration_failed", None),
        (8, "1-1.3", "usb.enumeration_failed", -71),
        (9, "1-1.3", "usb.enumeration_failed", None),
        (10, "1-1.3.2", "usb.enumeration_failed", -32),
        (11, "1-1.3.1", "usb.enumeration_failed", -110),
        (12, "1-1", "usb.enumeration_failed", -71),
    ]


def test_journal_and_timestampless_forms() -> None:
    assert sigs("enumeration-failure.journal") == [
        (1, "1-1.1.3.1", "usb.new_device", None),
        (2, "1-1.1.3.1", "usb.enumeration_failed", -71),
        (3, "1-1.1.3.1", "usb.enumeration_failed", None),
        (4, "1-1.1.3.1", "usb.enumeration_failed", -71),
    ]
    assert sigs("dmesg-t.txt") == [
        (1, "2-1.1", "usb.enumeration_failed", -110),
        (2, "2-1.1", "usb.enumeration_failed", -110),
        (3, "2-1.1", "usb.enumeration_failed", None),
    ]


def test_uvcvideo_lines() -> None:
    assert sigs("uvcvideo.dmesg") == [
        (1, None, "video.control_error", -32),
        (2, None, "video.control_error", -110),
        (4, None, "video.control_error", -32),
        (5, None, "video.control_error", -32),
        (6, None, "video.stream_error", -5),
    ]


def test_newer_uvcvideo_lines_carry_the_port() -> None:
    from agent.signals.kmsg import parse_line

    s = parse_line("uvcvideo 3-2:1.0: Failed to query (GET_CUR) UVC control 11 on unit 2: -110 (exp. 1).")
    assert s is not None and (s.port, s.code, s.errno) == ("3-2", "video.control_error", -110)
    s = parse_line("uvcvideo 1-1:1.0: Non-zero status (-71) in video completion handler.")
    assert s is not None and (s.port, s.code, s.errno) == ("1-1", "usb.protocol_error", -71)


def test_audio_lines() -> None:
    assert sigs("audio.dmesg") == [
        (1, "1-1.3.4", "audio.stream_error", -71),
        (2, "1-3.3.2.1", "audio.stream_error", -28),
    ]


def test_power_reset_and_unrelated_lines() -> None:
    assert sigs("power-and-reset.dmesg") == [
        (1, "3-1", "usb.over_current", None),
        (2, "3-5", "usb.disconnect", None),
        (3, "1-1.2", "usb.over_current", None),
        (4, "1-1.1.3", "usb.over_current", None),
        (6, "1-1.3", "usb.reset", None),
        (7, "1-1.2", "usb.reset", None),
        (8, "4-1", "usb.new_device", None),
        (9, "4-1", "usb.speed_degraded", None),
    ]


def test_lines_recorded_from_the_rig_kernel() -> None:
    assert sigs("rig-stalled-camera.dmesg") == [
        (1, "1-1", "usb.new_device", None),
        (5, "1-1", "video.control_error", -32),
        (7, "1-1", "video.control_error", -32),
        (8, "1-1", "video.stream_error", -5),
    ]


def test_late_camera_lines_from_the_rig() -> None:
    assert sigs("rig-late-camera.dmesg") == [
        (1, "1-1", "video.control_error", -110),
        (3, "1-1", "video.control_error", None),  # a short answer, not an errno
        (4, "1-1", "video.stream_error", -5),
    ]


def test_kmsg_records_and_continuations() -> None:
    assert sigs("kmsg.records") == [(1, "3-2", "usb.disconnect", None),
                                    (4, "3-2", "usb.enumeration_failed", -71)]


def test_signals_command_prints_one_object_per_recognised_line() -> None:
    out = run_cli("agent.cli", "signals", "--kernel-log", str(DATA / "audio.dmesg"))
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"line_no": 1, "port": "1-1.3.4", "code": "audio.stream_error", "errno": -71},
        {"line_no": 2, "port": "1-3.3.2.1", "code": "audio.stream_error", "errno": -28},
    ]


def test_signals_command_unreadable_file() -> None:
    out = run_cli("agent.cli", "signals", "--kernel-log", "/nonexistent/kern.log")
    assert out.returncode == 2 and "cannot read" in out.stderr


@pytest.mark.parametrize(("line", "expected"), [
    ("usb 1-2: 1:1: cannot set freq 48000 to ep 0x1, error -110", ("1-2", "audio.stream_error", -110)),
    ("usb 1-1.2: 3:1: cannot get freq at ep 0x84", ("1-1.2", "audio.stream_error", None)),
    ("usb 1-2: can't set config #1, error -110", ("1-2", "usb.timeout", -110)),
    ("usb 1-1.2: clear tt 1 (9042) error -71", ("1-1.2", "usb.protocol_error", -71)),
    ("usb 2-1: new SuperSpeed Gen 1 USB device number 2 using xhci_hcd", ("2-1", "usb.new_device", None)),
])
def test_more_forms(line: str, expected: tuple[str, str, int | None]) -> None:
    from agent.signals.kmsg import parse_line

    s = parse_line(line)
    assert s is not None and (s.port, s.code, s.errno) == expected


@pytest.mark.parametrize("line", ["", "random text", "usb 1-2: New USB device found, idVendor=046d, idProduct=0843",
                                  "\x00\xff garbage", "usb 1-2: " + "x" * 5000])
def test_unrelated_lines_give_nothing(line: str) -> None:
    from agent.signals.kmsg import parse_line

    assert parse_line(line) is None


# ---------------------------------------------------------------- line classes older kernels and hubs print


def test_not_running_at_top_speed_is_a_speed_degradation_on_that_port() -> None:
    assert sigs("top-speed.dmesg") == [
        (1, "1-1", "usb.new_device", None),
        (2, "1-1", "usb.speed_degraded", None),
        (3, "4-1", "usb.speed_degraded", None),
    ]


def test_old_hub_lines_name_a_port_number_under_the_hub() -> None:
    assert sigs("hub-port-number.dmesg") == [
        (1, "1-1", "usb.over_current", None),  # hub 1-0 is bus 1's root hub: port 1 is 1-1
        (2, "1-3", "usb.over_current", None),
        (3, "2-1.5", "usb.over_current", None),  # hub 2-1, port 5
        (4, "1-2", "usb.over_current", None),
        (5, "3-1", "usb.protocol_error", None),  # disabled by hub (EMI?)
        (6, "3-1", "usb.over_current", None),
        (7, "3-1", "usb.disconnect", None),  # the old "address N" form
        (8, "1-1.2", "usb.enumeration_failed", None),
    ]


def test_audio_lines_without_a_port_keep_the_device_number() -> None:
    with open(DATA / "audio-no-port.dmesg", encoding="utf-8") as fh:
        got = [(s.line_no, s.port, s.code, s.errno, s.devnum, s.iface) for s in parse_lines(fh)]
    assert got == [
        (1, "4-1.4", "usb.new_device", None, None, None),
        (2, None, "audio.stream_error", None, 4, 1),
        (3, "4-1.4", "usb.disconnect", None, None, None),
        (4, None, "audio.stream_error", -19, None, None),
        (5, None, "audio.stream_error", None, 3, 1),
        (6, None, "audio.stream_error", -18, None, None),
        (7, None, "audio.stream_error", -28, None, None),
    ]


def test_uvcvideo_urb_failures_keep_the_errno_in_parentheses() -> None:
    assert sigs("uvcvideo-urb.dmesg") == [
        (1, None, "video.stream_error", -90),
        (2, None, "video.stream_error", -28),
        (3, None, "video.stream_error", -1),
    ]


@pytest.mark.parametrize(("line", "expected"), [
    ("uvcvideo 1-1:1.1: Failed to submit URB 0 (-28).", ("1-1", "video.stream_error", -28)),
    ("uvcvideo 3-2:1.1: Failed to resubmit video URB (-19).", ("3-2", "video.stream_error", -19)),
    ("usb 1-2: Failed to submit URB 0 (-28).", ("1-2", "video.stream_error", -28)),
    ("uvcvideo: Failed to submit URB 0.", (None, "video.stream_error", None)),
    ("hub 1-1.4:1.0: over-current condition on port 2", ("1-1.4.2", "usb.over_current", None)),
    ("4:1:1: usb_set_interface failed (-22)", (None, "audio.stream_error", -22)),
])
def test_more_old_forms(line: str, expected: tuple[str | None, str, int | None]) -> None:
    from agent.signals.kmsg import parse_line

    s = parse_line(line)
    assert s is not None and (s.port, s.code, s.errno) == expected


@pytest.mark.parametrize("line", [
    "hub 1-0:1.0: USB hub found",
    "hub 1-0:1.0: 4 ports detected",
    "cannot submit urb",  # names nothing
    "10:30:00: usb_set_interface worked",
])
def test_near_misses_give_nothing(line: str) -> None:
    from agent.signals.kmsg import parse_line

    assert parse_line(line) is None


# ---------------------------------------------------------------- ports from sysfs (a fake tree, as the agent reads it)


def fake_sysfs(root: Path, devices: dict[str, tuple[int, list[tuple[int, int]]]], cards: dict[int, str]) -> Path:
    """devices: port -> (devnum, [(interface number, class)]); cards: ALSA card -> interface dir."""
    base = root / "bus" / "usb" / "devices"
    base.mkdir(parents=True)
    for port, (devnum, ifaces) in devices.items():
        (base / port).mkdir()
        (base / port / "devnum").write_text(f"{devnum}\n")
        for num, cls in ifaces:
            d = base / f"{port}:1.{num}"
            d.mkdir()
            (d / "bInterfaceNumber").write_text(f"{num:02x}\n")
            (d / "bInterfaceClass").write_text(f"{cls:02x}\n")
    for card, iface_dir in cards.items():
        c = root / "class" / "sound" / f"card{card}"
        c.mkdir(parents=True)
        (c / "device").symlink_to(base / iface_dir)
    return root


def test_device_number_resolves_to_the_port_with_that_audio_interface(tmp_path: Path) -> None:
    from agent.signals.kmsg import parse_line
    from agent.signals.resolve import resolve

    # the headset of audio-no-port.dmesg (device number 4 on 4-1.4), and another bus's device 4: a webcam
    # without an audio interface 1, and a device 3 that has one
    root = fake_sysfs(tmp_path / "sys", {"4-1.4": (4, [(0, 1), (1, 1), (3, 3)]), "2-1": (4, [(0, 14), (1, 14)]),
                                         "3-2": (3, [(0, 1), (1, 1)])}, {1: "4-1.4:1.0", 2: "3-2:1.0"})
    lines = ["[ 7059.479612] 4:1:1: usb_set_interface failed",
             "Jan 12 13:01:09 recencyeffect-studio kernel: [ 1438.831689] ALSA pcm.c:250 3:1:1: "
             "usb_set_interface failed",
             "[    1.0] 9:1:1: usb_set_interface failed",  # no such device: stays without a port
             "Oct 22 23:10:36 luke-ubuntu kernel: [195576.458372] cannot submit urb (err = -18)"]  # two cards here
    got = resolve([s for s in (parse_line(x, i) for i, x in enumerate(lines)) if s is not None], str(root))
    assert [(s.port, s.code) for s in got] == [("4-1.4", "audio.stream_error"), ("3-2", "audio.stream_error"),
                                              (None, "audio.stream_error"), (None, "audio.stream_error")]


def test_a_line_naming_no_device_resolves_to_the_only_usb_sound_card(tmp_path: Path) -> None:
    from agent.signals.kmsg import parse_line
    from agent.signals.resolve import resolve

    root = fake_sysfs(tmp_path / "sys", {"1-3.1": (7, [(0, 1), (1, 1), (2, 1)])}, {1: "1-3.1:1.0"})
    (root / "class" / "sound" / "card0").mkdir()  # the onboard HDA card: no USB device behind it
    (root / "class" / "sound" / "card0" / "device").symlink_to(tmp_path)
    s = parse_line("[ 1202.390000] cannot submit datapipe for urb 0, error -28: not enough bandwidth")
    assert s is not None
    [r] = resolve([s], str(root))
    assert (r.port, r.errno) == ("1-3.1", -28)
    # two devices sharing a device number on different buses, both with audio interface 1: no guess
    root2 = fake_sysfs(tmp_path / "sys2", {"1-1": (4, [(1, 1)]), "2-1": (4, [(1, 1)])}, {})
    s2 = parse_line("4:1:1: usb_set_interface failed")
    assert s2 is not None and resolve([s2], str(root2))[0].port is None
    assert resolve([s2], str(tmp_path / "nowhere"))[0].port is None  # no sysfs at all


def test_resolved_audio_line_becomes_an_error_of_that_device(tmp_path: Path) -> None:
    from agent.signals.kmsg import parse_line
    from agent.signals.resolve import resolve
    from agent.watch import Tick, Watcher

    spk = {"key": "0d8c:000c@4-1.4", "vid": "0d8c", "pid": "000c", "kind": "speakerphone", "port": "4-1.4",
           "speed": "full"}
    w = Watcher()
    w.start([spk])
    root = fake_sysfs(tmp_path / "sys", {"4-1.4": (4, [(0, 1), (1, 1)])}, {1: "4-1.4:1.0"})
    sigs_ = [s for s in (parse_line(x, i) for i, x in enumerate(
        ["[ 7059.479612] 4:1:1: usb_set_interface failed", "[ 7059.480618] 4:1:1: usb_set_interface failed"]))
        if s is not None]
    events, _ = w.step(Tick(devices=[spk], signals=resolve(sigs_, str(root))))
    assert [(e["type"], e["device"]["key"], e["error"]["code"], e["error"]["count"]) for e in events] == [
        ("device.error", "0d8c:000c@4-1.4", "audio.stream_error", 2)]



def test_a_very_long_line_is_cut_before_any_pattern_runs() -> None:
    """One 108 KB line stalled the agent's loop for 22 s (the patterns' time grew with the square of it)."""
    import time

    from agent.signals.kmsg import parse_line

    t0 = time.perf_counter()
    assert parse_line("[ 1.0] " + "usb 1-2: " * 12_000) is None
    sig = parse_line("[ 2.0] usb 1-2: device descriptor read/64, error -71" + " x" * 100_000)
    assert time.perf_counter() - t0 < 1.0
    assert sig is not None and sig.code == "usb.enumeration_failed" and sig.port == "1-2"
