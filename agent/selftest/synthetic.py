"""Captures for the simulated bus: a device that answers as the bus file says.

They behave as a device node would towards the self-test: the stand-in node file (the bus
entry's first ``nodes`` path, if any) is really held open for the whole capture, frames come at
the camera's pace, and ``live`` frames and samples carry noise while ``frozen``/``silent`` ones
do not. The same measuring and guard code runs on them as on V4L2 and ALSA.
"""

from __future__ import annotations

import os
import random
import time

from agent.selftest.run import StreamFailed, Unusable, os_error

VIDEO_MODES = ("live", "frozen", "no_frames")
AUDIO_MODES = ("live", "silent", "none")
WIDTH, HEIGHT, FPS = 160, 120, 30.0
RATE = 48000


class _Held:
    def __init__(self, node: str | None) -> None:
        self.node = node
        self.fd: int | None = None

    def open(self) -> None:
        if self.node:
            try:
                self.fd = os.open(self.node, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise os_error(exc, "open", self.node) from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SyntheticVideo:
    def __init__(self, mode: str, node: str | None, seed: int = 0) -> None:
        if mode not in VIDEO_MODES:
            raise Unusable(f"simulated video mode {mode!r}")
        self.mode, self.held, self.rng = mode, _Held(node), random.Random(seed)
        self.scene = self.rng.randbytes(WIDTH * HEIGHT * 2)
        self.next_at = 0.0
        self.damaged = 0

    def start(self) -> tuple[str, int, int]:
        self.held.open()
        self.next_at = time.monotonic() + 1 / FPS
        return "YUYV", WIDTH, HEIGHT

    def next_frame(self, timeout: float) -> bytes | None:
        if self.mode == "no_frames":
            time.sleep(timeout)
            return None
        wait = self.next_at - time.monotonic()
        if wait > timeout:
            time.sleep(timeout)
            return None
        time.sleep(max(0.0, wait))
        self.next_at += 1 / FPS
        if self.mode == "frozen":
            return self.scene
        frame = bytearray(self.scene)  # the same scene with sensor noise on every pixel
        noise = self.rng.randbytes(len(frame) // 8)
        for i, n in enumerate(noise):
            frame[i * 8] = (frame[i * 8] + (n & 3) - 1) & 0xFF
        return bytes(frame)

    def close(self) -> None:
        self.held.close()


class SyntheticAudio:
    def __init__(self, mode: str, node: str | None, seed: int = 0) -> None:
        if mode not in AUDIO_MODES:
            raise Unusable(f"simulated audio mode {mode!r}")
        self.mode, self.held, self.rng = mode, _Held(node), random.Random(seed)
        self.t0 = 0.0
        self.sent = 0

    def start(self) -> tuple[str, int, int]:
        self.held.open()
        if self.mode == "none":
            raise StreamFailed("the simulated microphone would not start", -5)
        self.t0 = time.monotonic()
        return "S16_LE", RATE, 1

    def read(self, timeout: float) -> bytes:
        time.sleep(timeout)
        due = int((time.monotonic() - self.t0) * RATE) - self.sent
        self.sent += due
        if self.mode == "silent":
            return bytes(2 * due)
        # room noise around -40 dBFS
        return b"".join(int(self.rng.gauss(0, 330)).to_bytes(2, "little", signed=True) for _ in range(due))

    def close(self) -> None:
        self.held.close()
