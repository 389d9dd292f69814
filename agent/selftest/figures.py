"""Figures from frames and samples: what the self-test measures, and its verdict.

Only these figures leave the PC. Frames are compared by a 128-bit digest of the previous
frame, so no frame is kept; samples are summed as they arrive.
"""

from __future__ import annotations

import array
import hashlib
import math
import sys
from collections import Counter
from typing import Any

# Where brightness comes from, per pixel format (docs/self-test.md)
LUMA_FROM = {"YUYV": "yuyv_y", "YVYU": "yuyv_y", "UYVY": "uyvy_y", "VYUY": "uyvy_y", "GREY": "grey",
             "MJPG": "mjpeg_bytes", "JPEG": "mjpeg_bytes"}


def _luma(frame: bytes | memoryview, fourcc: str) -> bytes | memoryview:
    src = LUMA_FROM.get(fourcc, "mjpeg_bytes")
    if src == "yuyv_y":
        return frame[0::2]
    if src == "uyvy_y":
        return frame[1::2]
    return frame  # GREY is all luma; for MJPEG the compressed bytes stand in (a proxy, not luma)


MAX_LUMA_VALUES = 65536  # per frame; a larger frame is sampled evenly


def mean_variance(data: bytes | memoryview) -> tuple[float, float]:
    """Mean and population variance of byte values (at most MAX_LUMA_VALUES, evenly spaced)."""
    # an odd step, so a pattern repeating every 2 values (alternate pixels) cannot alias
    step = (-(-len(data) // MAX_LUMA_VALUES)) | 1 if len(data) > MAX_LUMA_VALUES else 1
    b = bytes(data[::step])
    n = len(b)
    if n == 0:
        return 0.0, 0.0
    hist = Counter(b)
    s = sum(v * c for v, c in hist.items())
    s2 = sum(v * v * c for v, c in hist.items())
    mean = s / n
    return mean, max(0.0, s2 / n - mean * mean)


class VideoMeter:
    """Frames of one capture: count, time to the first, identical neighbours, brightness."""

    def __init__(self, fourcc: str, width: int, height: int) -> None:
        self.fourcc, self.width, self.height = fourcc, width, height
        self.frames = 0
        self.error_frames = 0  # frames the driver flagged as damaged (not counted as frames)
        self.first_frame_s: float | None = None
        self.identical_pairs = 0
        self._prev: bytes | None = None
        self._means: list[float] = []
        self._vars: list[float] = []

    def add(self, frame: bytes | memoryview, elapsed_s: float) -> None:
        if self.first_frame_s is None:
            self.first_frame_s = elapsed_s
        digest = hashlib.blake2b(frame, digest_size=16).digest()
        if self._prev is not None and digest == self._prev:
            self.identical_pairs += 1
        self._prev = digest
        self.frames += 1
        m, v = mean_variance(_luma(frame, self.fourcc))
        self._means.append(m)
        self._vars.append(v)

    def figures(self) -> dict[str, Any]:
        n = len(self._means)
        return {
            "frames": self.frames, "error_frames": self.error_frames,
            "first_frame_s": None if self.first_frame_s is None else round(self.first_frame_s, 3),
            "pairs": max(0, self.frames - 1), "identical_pairs": self.identical_pairs,
            "brightness_mean": round(sum(self._means) / n, 2) if n else None,
            "brightness_variance": round(sum(self._vars) / n, 2) if n else None,
            "brightness_from": LUMA_FROM.get(self.fourcc, "mjpeg_bytes"),
            "format": self.fourcc, "width": self.width, "height": self.height,
        }


def video_verdict(fig: dict[str, Any]) -> tuple[str | None, str]:
    """(error code or None, one-line reason)."""
    if not fig["frames"]:
        extra = f" ({fig['error_frames']} damaged)" if fig.get("error_frames") else ""
        return "video.no_frames", f"self-test: no frame{extra} within the time allowed"
    if fig["pairs"] and fig["identical_pairs"] == fig["pairs"]:
        return "video.frozen", (f"self-test: all {fig['frames']} frames byte-identical "
                                f"(a live sensor always has noise)")
    return None, f"self-test: {fig['frames']} frames, {fig['pairs'] - fig['identical_pairs']} of " \
                 f"{fig['pairs']} consecutive pairs differ"


SAMPLE_FORMATS = {"S16_LE": ("h", 2, 32768.0), "S32_LE": ("i", 4, 2147483648.0)}


class AudioMeter:
    """Samples of one capture: count, RMS, peak, share of exact zeros."""

    def __init__(self, fmt: str, rate: int, channels: int) -> None:
        self.fmt, self.rate, self.channels = fmt, rate, channels
        self.typecode, self.width, self.full = SAMPLE_FORMATS[fmt]
        self.samples = 0
        self.zeros = 0
        self.peak = 0
        self.sum_sq = 0
        self.first_sample_s: float | None = None

    def add(self, raw: bytes | memoryview, elapsed_s: float) -> None:
        usable = len(raw) - len(raw) % self.width
        if usable <= 0:
            return
        a = array.array(self.typecode)
        a.frombytes(bytes(raw[:usable]))
        if sys.byteorder != "little":  # pragma: no cover - the formats are little-endian
            a.byteswap()
        if self.first_sample_s is None:
            self.first_sample_s = elapsed_s
        self.samples += len(a)
        self.zeros += a.count(0)
        self.peak = max(self.peak, max(a), -min(a))
        self.sum_sq += sum(x * x for x in a)

    def figures(self) -> dict[str, Any]:
        rms = math.sqrt(self.sum_sq / self.samples) / self.full if self.samples else None
        peak = self.peak / self.full if self.samples else None

        def dbfs(x: float | None) -> float | None:
            return round(20 * math.log10(x), 1) if x else None

        return {
            "samples": self.samples, "seconds": round(self.samples / (self.rate * self.channels), 3),
            "first_sample_s": None if self.first_sample_s is None else round(self.first_sample_s, 3),
            "rms": None if rms is None else round(rms, 6), "peak": None if peak is None else round(peak, 6),
            "rms_dbfs": dbfs(rms), "peak_dbfs": dbfs(peak),
            "zero_fraction": round(self.zeros / self.samples, 4) if self.samples else None,
            "format": self.fmt, "rate": self.rate, "channels": self.channels,
        }


def audio_verdict(fig: dict[str, Any]) -> tuple[str | None, str]:
    if not fig["samples"]:
        return "audio.no_signal", "self-test: no samples arrived"
    if not fig["peak"]:
        return "audio.no_signal", f"self-test: {fig['samples']} samples, all exactly zero (digital silence)"
    return None, f"self-test: {fig['samples']} samples, RMS {fig['rms_dbfs']} dBFS, peak {fig['peak_dbfs']} dBFS"
