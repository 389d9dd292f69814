"""The idle self-test: its measuring on synthesised and recorded-shape buffers, the V4L2/ALSA
structures, its scheduling, its events on the wire, and (tests/test_selftest_guard.py) that it
never opens a device another process holds."""

from __future__ import annotations

import array
import datetime as dt
import json
import math
import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import load
from agent.runner import Observer, make_scheduler
from agent.selftest.alsa import HW_PARAMS_SIZE, SNDRV_PCM_IOCTL_HW_PARAMS, SNDRV_PCM_IOCTL_READI_FRAMES, HwParams
from agent.selftest.figures import AudioMeter, VideoMeter, audio_verdict, mean_variance, video_verdict
from agent.selftest.schedule import SelfTestScheduler, next_daily
from agent.selftest.v4l2 import VIDIOC_DQBUF, VIDIOC_QUERYCAP, VIDIOC_S_FMT, fourcc_int, fourcc_str, pick_format
from agent.watch import Tick, Usage
from common.protocol import envelope, validate_payload

W, H = 160, 120


def yuyv(y: bytes) -> bytes:
    """A YUYV frame with the given luma and neutral chroma."""
    out = bytearray(len(y) * 2)
    out[0::2] = y
    out[1::2] = b"\x80" * len(y)
    return bytes(out)


def video(frames: list[bytes], fourcc: str = "YUYV") -> dict[str, Any]:
    m = VideoMeter(fourcc, W, H)
    for i, f in enumerate(frames):
        m.add(f, 0.05 * (i + 1))
    return m.figures()


def test_live_frames_pass_with_their_brightness() -> None:
    rng = random.Random(7)
    scene = bytes(rng.randrange(60, 200) for _ in range(W * H))
    frames = [yuyv(bytes(min(255, v + rng.randrange(0, 3)) for v in scene)) for _ in range(5)]
    fig = video(frames)
    assert (fig["frames"], fig["pairs"], fig["identical_pairs"], fig["first_frame_s"]) == (5, 4, 0, 0.05)
    assert video_verdict(fig)[0] is None
    m, v = mean_variance(scene)
    assert abs(fig["brightness_mean"] - m) < 1.5 and abs(fig["brightness_variance"] - v) < 0.05 * v
    assert fig["brightness_from"] == "yuyv_y"


def test_exact_luma_figures_ignore_chroma() -> None:
    fig = video([yuyv(bytes([10, 20]) * (W * H // 2)), yuyv(bytes([20, 10]) * (W * H // 2))])
    assert (fig["brightness_mean"], fig["brightness_variance"]) == (15.0, 25.0)
    uyvy = VideoMeter("UYVY", 2, 1)
    uyvy.add(bytes([0x80, 100, 0x80, 100]), 0.1)
    assert uyvy.figures()["brightness_mean"] == 100.0 and uyvy.figures()["brightness_from"] == "uyvy_y"


def test_identical_frames_are_frozen_and_no_frames_is_no_frames() -> None:
    still = yuyv(bytes(random.Random(1).randbytes(W * H)))
    code, msg = video_verdict(video([still] * 5))
    assert code == "video.frozen" and "5 frames byte-identical" in msg
    # one differing pair is enough for a live sensor
    assert video_verdict(video([still, still, still[:-1] + b"\0", still]))[0] is None
    fig = video([])
    assert video_verdict(fig)[0] == "video.no_frames"
    assert (fig["frames"], fig["first_frame_s"], fig["brightness_mean"]) == (0, None, None)


def test_mjpeg_uses_the_compressed_bytes_as_a_proxy() -> None:
    jpeg = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
    fig = video([jpeg, jpeg[:-3] + b"\x01\xff\xd9"], "MJPG")
    assert fig["brightness_from"] == "mjpeg_bytes" and video_verdict(fig)[0] is None
    assert fig["brightness_mean"] == pytest.approx(sum(jpeg) / len(jpeg), abs=0.5)


def test_large_frames_are_sampled_evenly() -> None:
    frame = yuyv(bytes([0, 255]) * (1920 * 1080 // 2))
    m = VideoMeter("YUYV", 1920, 1080)
    t = time.perf_counter()
    m.add(frame, 0.1)
    fig = m.figures()
    assert time.perf_counter() - t < 1.0
    assert 120 < fig["brightness_mean"] < 135 and fig["brightness_variance"] > 15000


def pcm(samples: list[int]) -> bytes:
    return array.array("h", samples).tobytes()


def test_audio_noise_passes_with_rms_and_peak() -> None:
    amp = 16384
    sine = [round(amp * math.sin(2 * math.pi * 1000 * i / 48000)) for i in range(48000)]
    m = AudioMeter("S16_LE", 48000, 1)
    for i in range(0, 48000, 4800):
        m.add(pcm(sine[i:i + 4800]), 0.1 * (i // 4800 + 1))
    fig = m.figures()
    assert fig["samples"] == 48000 and fig["seconds"] == 1.0 and fig["first_sample_s"] == 0.1
    assert fig["rms"] == pytest.approx(0.5 / math.sqrt(2), rel=1e-3) and fig["peak"] == pytest.approx(0.5, rel=1e-3)
    assert fig["rms_dbfs"] == pytest.approx(-9.0, abs=0.1) and fig["peak_dbfs"] == pytest.approx(-6.0, abs=0.1)
    assert audio_verdict(fig)[0] is None


def test_digital_silence_and_no_samples_are_no_signal() -> None:
    m = AudioMeter("S16_LE", 48000, 2)
    m.add(bytes(96000 * 2), 0.1)
    m.add(b"\x00", 0.2)  # an odd trailing byte is not a sample
    fig = m.figures()
    assert (fig["samples"], fig["seconds"], fig["zero_fraction"], fig["rms_dbfs"]) == (96000, 1.0, 1.0, None)
    assert audio_verdict(fig) == ("audio.no_signal", "self-test: 96000 samples, all exactly zero (digital silence)")
    assert audio_verdict(AudioMeter("S16_LE", 48000, 1).figures())[0] == "audio.no_signal"
    quiet = AudioMeter("S32_LE", 48000, 1)
    quiet.add(array.array("i", [0] * 999 + [1 << 16]).tobytes(), 0.1)
    assert audio_verdict(quiet.figures())[0] is None  # one non-zero sample is not digital silence


def test_format_choice_and_struct_layouts() -> None:
    sizes = [("MJPG", 160, 120), ("YUYV", 160, 120), ("YUYV", 640, 360), ("H264", 64, 64), ("GREY", 320, 240)]
    assert pick_format(sizes) == ("YUYV", 160, 120)
    assert pick_format([("MJPG", 160, 90), ("YUYV", 160, 120)]) == ("MJPG", 160, 90)
    assert pick_format([("H264", 64, 64)]) is None
    assert fourcc_str(fourcc_int("YUYV")) == "YUYV" and fourcc_int("YUYV") == 0x56595559
    # ioctl numbers as <linux/videodev2.h> and <sound/asound.h> give them on x86-64
    assert (VIDIOC_QUERYCAP, VIDIOC_S_FMT, VIDIOC_DQBUF) == (0x80685600, 0xC0D05605, 0xC0585611)
    assert (SNDRV_PCM_IOCTL_HW_PARAMS, SNDRV_PCM_IOCTL_READI_FRAMES) == (0xC2604111, 0x80184151)
    hw = HwParams()
    assert len(hw.buf) == HW_PARAMS_SIZE and hw.mask_has(1, 2) and hw.interval(3) == (0, 0xFFFFFFFF)
    hw.set_mask(1, 2)
    hw.set_interval(3, 48000)
    assert hw.mask_has(1, 2) and not hw.mask_has(1, 10) and hw.interval(3) == (48000, 48000)
    assert struct.unpack_from("<I", hw.buf, 260 + 12 * 3 + 8)[0] == 4  # the integer flag


def test_next_daily() -> None:
    now = dt.datetime(2026, 11, 30, 2, 59)
    assert next_daily("03:00", now) == dt.datetime(2026, 11, 30, 3, 0)
    assert next_daily("03:00", dt.datetime(2026, 11, 30, 3, 0)) == dt.datetime(2026, 12, 1, 3, 0)


def test_config_keys_are_validated_with_one_line() -> None:
    from common.config import ConfigError

    cfg = load(env={})
    assert (cfg.self_test, cfg.self_test_settle_s, cfg.self_test_daily_at, cfg.self_test_min_interval_s) == (
        True, 30.0, "03:00", 600.0)
    assert load(env={"PANTAU_SELF_TEST": "off"}).self_test is False
    for env, key in [({"PANTAU_SELF_TEST": "sometimes"}, "PANTAU_SELF_TEST"),
                     ({"PANTAU_SELF_TEST_DAILY_AT": "3am"}, "self_test_daily_at"),
                     ({"PANTAU_SELF_TEST_FRAMES": "1"}, "self_test_frames"),
                     ({"PANTAU_SELF_TEST_MIN_INTERVAL_S": "0"}, "PANTAU_SELF_TEST_MIN_INTERVAL_S")]:
        with pytest.raises(ConfigError) as ei:
            load(env=env)
        assert key in str(ei.value) and "\n" not in str(ei.value)


# ---------------------------------------------------------------- scheduling, on the simulated bus
CAM = {"vid": "046d", "pid": "085e", "serial": "C1", "kind": "camera", "port": "1-2"}
SPK = {"vid": "0b0e", "pid": "2456", "serial": "S1", "kind": "speakerphone", "port": "1-3"}


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = dt.datetime(2026, 11, 30, 12, 0)


class Room:
    def __init__(self, tmp: Path, *devices: dict[str, Any], **cfg: Any) -> None:
        self.bus = tmp / "bus.json"
        self.set(*devices)
        self.cfg = load(env={}, usb_backend="simulated", simulated_bus=str(self.bus), state_dir=str(tmp), **cfg)
        self.obs = Observer(self.cfg)
        self.clock = Clock()
        s = make_scheduler(self.cfg, self.obs.platform, threading.Event())
        assert s is not None
        self.sched: SelfTestScheduler = s
        self.sched.clock, self.sched.wall = (lambda: self.clock.mono), (lambda: self.clock.wall)
        self.sched.next_night = next_daily("03:00", self.clock.wall)

    def set(self, *devices: dict[str, Any]) -> None:
        tmp = self.bus.with_suffix(".tmp")
        tmp.write_text(json.dumps({"devices": list(devices)}))
        os.replace(tmp, self.bus)
        st = self.bus.stat()
        os.utime(self.bus, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    def step(self, wait: bool = True) -> list[dict[str, Any]]:
        t = self.obs.look()
        self.sched.tick(t, self.obs.nodes)
        if wait and self.sched.worker is not None:
            self.sched.worker.join(10)
        return self.sched.events()


def test_attach_settle_min_interval_and_events_on_the_wire(tmp_path: Path) -> None:
    room = Room(tmp_path, {**CAM, "self_test": {"video": "frozen"}}, SPK, self_test_settle_s=30)
    keys = [d["key"] for d in room.obs.look().devices]
    room.sched.attached(keys)
    assert room.step() == []  # settling
    room.clock.mono += 30
    ev = first = room.step()  # one device at a time: the camera first
    assert [(e["type"], e.get("error", {}).get("code")) for e in ev] == [
        ("device.self_test", None), ("device.error", "video.frozen")]
    ctx = ev[0]["context"]
    assert (ctx["test"], ctx["result"], ctx["trigger"], ctx["code"]) == ("video", "fail", "attach", "video.frozen")
    assert ctx["figures"]["frames"] == 5 and ctx["figures"]["identical_pairs"] == 4
    assert ev[1]["error"]["source"] == "probe" and ev[1]["context"]["in_use"] is False
    ev = room.step()
    assert [(e["type"], e["context"]["test"], e["context"]["result"]) for e in ev] == [
        ("device.self_test", "audio", "pass")]
    assert ev[0]["context"]["figures"]["rms_dbfs"] < -20 and ev[0]["context"]["figures"]["samples"] >= 48000
    recovered = {"type": "device.recovered", "device": ev[0]["device"], "error": {"code": "video.frozen"}}
    for i, e in enumerate([*first, *ev, recovered]):  # all of them valid on the wire
        body = {k: v for k, v in e.items() if k != "type"}
        validate_payload(envelope("room", "b" * 16, i + 1, "event", type=e["type"], **body))
    # a replug within the minimum interval waits for it; the camera now works: recovered
    room.set(CAM, SPK)
    room.sched.attached([keys[0]])
    room.clock.mono += 30
    assert room.step() == []
    room.clock.mono += 600
    ev = room.step()
    assert [(e["type"], e.get("error", {}).get("code")) for e in ev] == [
        ("device.self_test", None), ("device.recovered", "video.frozen")]
    # the same failure twice is one device.error
    room.set({**CAM, "self_test": {"video": "no_frames"}}, SPK)
    for _ in range(2):
        room.sched.attached([keys[0]])
        room.clock.mono += 700
        ev = room.step()
        assert ev[0]["context"]["code"] == "video.no_frames"
    assert [e["type"] for e in ev] == ["device.self_test"]


def test_busy_devices_and_meetings_wait_and_the_night_tests_everyone(tmp_path: Path) -> None:
    room = Room(tmp_path, {**CAM, "in_use": True, "users": ["zoom"]}, {**SPK, "meeting": True})
    keys = [d["key"] for d in room.obs.look().devices]
    room.sched.attached(keys)
    room.clock.mono += 60
    assert room.step() == [] and room.sched.worker is None and set(room.sched.due) == set(keys)
    room.set(CAM, SPK)  # the meeting is over
    room.clock.mono += 1
    assert [e["context"]["trigger"] for e in room.step()] == ["attach"]
    assert [e["context"]["trigger"] for e in room.step()] == ["attach"]
    assert room.step() == [] and room.sched.due == {}
    room.clock.wall = dt.datetime(2026, 12, 1, 3, 0, 5)
    room.clock.mono += 3600
    assert [e["context"]["trigger"] for e in room.step() + room.step()] == ["nightly", "nightly"]
    assert room.sched.next_night == dt.datetime(2026, 12, 2, 3, 0)


def test_switched_off(tmp_path: Path) -> None:
    bus = tmp_path / "bus.json"
    bus.write_text(json.dumps({"devices": [CAM]}))
    cfg = load(env={"PANTAU_SELF_TEST": "false"}, usb_backend="simulated", simulated_bus=str(bus))
    assert make_scheduler(cfg, Observer(cfg).platform, threading.Event()) is None


def test_a_failing_tick_without_usage_is_not_idle_by_accident(tmp_path: Path) -> None:
    room = Room(tmp_path, CAM)
    t = room.obs.look()
    room.sched.attached([d["key"] for d in t.devices])
    room.clock.mono += 60
    busy = Tick(devices=t.devices, usage={t.devices[0]["key"]: Usage(True, ["zoom"])})
    room.sched.tick(busy, room.obs.nodes)
    assert room.sched.worker is None
