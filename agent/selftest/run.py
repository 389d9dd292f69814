"""Drive one self-test capture under the idle guard.

A capture (v4l2.py, alsa.py, synthetic.py) opens the device node, streams, and closes. Before
it opens, and between frames or sample chunks, the guard looks in /proc for any other process
holding any of the device's nodes: if one does, the capture lets go at once (``Busy``) and the
test is tried again later. What remains is the race between two looks (docs/self-test.md).
"""

from __future__ import annotations

import errno as errnos
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.selftest.figures import AudioMeter, VideoMeter, audio_verdict, video_verdict
from agent.usage import holders


class Busy(Exception):
    """Another process holds the device (or the driver says it is busy): let go, try later."""


class Unusable(Exception):
    """The node cannot be tested (gone, no permission, not a capture node, no usable format)."""


class StreamFailed(Exception):
    """The device was opened but would not stream: a fault, reported with its errno."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def os_error(exc: OSError, what: str, node: str) -> Exception:
    """An OSError while opening or setting up: busy, unusable, or (after opening) a stream failure."""
    if exc.errno == errnos.EBUSY:
        return Busy(f"{node}: {what}: busy")
    if exc.errno in (errnos.ENOENT, errnos.ENODEV, errnos.ENXIO, errnos.EACCES, errnos.EPERM, errnos.ENOTTY,
                     errnos.EINVAL):
        return Unusable(f"{node}: {what}: {exc.strerror}")
    return StreamFailed(f"{node}: {what}: {exc.strerror}", -(exc.errno or 0))


class IdleGuard:
    """Is any process but this one holding any of the device's nodes?"""

    def __init__(self, nodes: Iterable[str], proc_root: str = "/proc") -> None:
        self.nodes = list(nodes)
        self.proc_root = proc_root
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        held = holders(self.nodes, self.proc_root, exclude_pids={os.getpid()})
        if held:
            users = sorted({u for us in held.values() for u in us})
            raise Busy(f"opened by {', '.join(users)}")


GONE = (-errnos.ENODEV, -errnos.ENOENT, -errnos.ESHUTDOWN)


class VideoCapture(Protocol):
    damaged: int  # frames the driver flagged as damaged so far

    def start(self) -> tuple[str, int, int]: ...  # fourcc, width, height; raises Busy/Unusable/StreamFailed
    def next_frame(self, timeout: float) -> bytes | None: ...  # None: no frame within timeout
    def close(self) -> None: ...


class AudioCapture(Protocol):
    def start(self) -> tuple[str, int, int]: ...  # format, rate, channels
    def read(self, timeout: float) -> bytes: ...  # whatever arrived within timeout, possibly b""
    def close(self) -> None: ...


@dataclass
class Settings:
    frames: int = 5
    first_frame_s: float = 5.0
    audio_s: float = 1.0
    slice_s: float = 0.1  # longest wait between two guard checks


@dataclass
class Result:
    test: str  # video | audio
    node: str
    outcome: str  # pass | fail | busy | skipped
    code: str | None = None
    message: str = ""
    errno: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    cpu_s: float = 0.0
    guard_checks: int = 0


@dataclass
class SelfTest:
    """One test the platform can run on a device: which kind, on which node, how to open it."""

    kind: str  # video | audio
    node: str
    open: Callable[[], Any]  # -> VideoCapture | AudioCapture
    guard_nodes: list[str]


def run(test: SelfTest, settings: Settings, proc_root: str = "/proc") -> Result:
    guard = IdleGuard(test.guard_nodes, proc_root)
    t0, c0 = time.monotonic(), time.thread_time()
    res = Result(test.kind, test.node, "skipped")
    try:
        guard.check()  # never open a device another process holds
        cap = test.open()
        try:
            res = (_video if test.kind == "video" else _audio)(cap, guard, settings, test.node)
        finally:
            cap.close()
    except Busy as exc:
        res = Result(test.kind, test.node, "busy", message=str(exc))
    except Unusable as exc:
        res = Result(test.kind, test.node, "skipped", message=str(exc))
    res.duration_s = round(time.monotonic() - t0, 3)
    res.cpu_s = round(time.thread_time() - c0, 4)
    res.guard_checks = guard.checks
    return res


def _video(cap: VideoCapture, guard: IdleGuard, s: Settings, node: str) -> Result:
    t0 = time.monotonic()
    err: StreamFailed | None = None
    meter: VideoMeter | None = None
    try:
        fourcc, width, height = cap.start()
        meter = VideoMeter(fourcc, width, height)
        guard.check()
        deadline = t0 + s.first_frame_s
        while meter.frames < s.frames:
            now = time.monotonic()
            if now >= deadline:
                break
            frame = cap.next_frame(min(s.slice_s, deadline - now))
            guard.check()  # between frames: anyone else opening it makes us let go at once
            if frame is not None:
                meter.add(frame, time.monotonic() - t0)
                # after the first frame, each next one gets the same allowance again
                deadline = time.monotonic() + s.first_frame_s
    except StreamFailed as exc:
        if exc.errno in GONE:
            raise Unusable(f"{node}: gone during the test ({exc})") from None
        err = exc
    if meter is not None:
        meter.error_frames = cap.damaged
    fig = meter.figures() if meter is not None else VideoMeter("", 0, 0).figures()
    code, msg = video_verdict(fig)
    if err is not None and fig["frames"] == 0:
        code, msg = "video.no_frames", f"self-test: {err}"
    return Result("video", node, "fail" if code else "pass", code, msg, err.errno if err else None, fig)


def _audio(cap: AudioCapture, guard: IdleGuard, s: Settings, node: str) -> Result:
    t0 = time.monotonic()
    err: StreamFailed | None = None
    meter: AudioMeter | None = None
    try:
        fmt, rate, channels = cap.start()
        meter = AudioMeter(fmt, rate, channels)
        guard.check()
        want = int(s.audio_s * rate * channels)
        deadline = t0 + s.audio_s + max(1.0, s.audio_s)  # time to start, then the second of sound
        while meter.samples < want and time.monotonic() < deadline:
            data = cap.read(s.slice_s)
            guard.check()
            if data:
                meter.add(data, time.monotonic() - t0)
    except StreamFailed as exc:
        if exc.errno in GONE:
            raise Unusable(f"{node}: gone during the test ({exc})") from None
        err = exc
    fig = meter.figures() if meter is not None else AudioMeter("S16_LE", 1, 1).figures()
    code, msg = audio_verdict(fig)
    if err is not None and fig["samples"] == 0:
        code, msg = "audio.no_signal", f"self-test: {err}"
    return Result("audio", node, "fail" if code else "pass", code, msg, err.errno if err else None, fig)
