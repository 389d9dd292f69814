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
