"""The real libusb path: `pantau-agent once` under umockdev sees the camera and speakerphone
described in tests/data/umockdev (pyusb -> libusb -> sysfs, as on a room PC)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DATA = Path(__file__).parent / "data" / "umockdev"


def test_once_under_umockdev() -> None:
    if shutil.which("umockdev-run") is None:
        pytest.fail("umockdev is not installed: run `make test`, which installs it")
    devices = ["host", "camera", "speakerphone"]
    args = ["umockdev-run"] + [a for d in devices for a in ("-d", str(DATA / f"{d}.umockdev"))]
    env = {**os.environ, "PANTAU_AGENT_ID": "umockdev-room", "PANTAU_USB_BACKEND": "libusb"}
    out = subprocess.run([*args, "--", sys.executable, "-m", "agent.cli", "once"], capture_output=True, text=True,
                         timeout=60, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    got = {d["key"]: d for d in snap["devices"]}
    assert sorted(got) == ["046d:0843:A1B2C3D4", "0b0e:2456:0123456789AB"]  # the root hub is not watched
    cam, spk = got["046d:0843:A1B2C3D4"], got["0b0e:2456:0123456789AB"]
    assert (cam["kind"], cam["port"], cam["speed"], cam["max_speed"], cam["firmware"]) == (
        "camera", "1-2", "high", "high", "0.13")
    assert (cam["vendor"], cam["product"], cam["in_use"]) == ("Logitech", "Logitech Webcam C930e", False)
    assert (spk["kind"], spk["port"], spk["speed"], spk["max_speed"]) == ("speakerphone", "1-3", "full", "full")
    assert set(snap["host"]) == {"cpu_pct", "mem_pct", "disk_pct", "uptime_s", "temp_c"}


def test_recordings_are_what_build_py_writes(tmp_path: Path) -> None:
    """The committed files are reproducible from their field-by-field source."""
    subprocess.run([sys.executable, str(DATA / "build.py"), str(tmp_path)], check=True)
    built = sorted(p.name for p in tmp_path.glob("*.umockdev"))
    assert built == ["camera.umockdev", "host.umockdev", "speakerphone.umockdev"]
    for name in built:
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name
