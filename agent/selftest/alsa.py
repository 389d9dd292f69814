"""Linux microphone capture through the ALSA PCM ioctls, in pure Python (x86-64/aarch64 layouts).

Opens ``/dev/snd/pcmC<card>D<dev>c`` directly (the hardware device, as ``hw:C,D``), asks for
interleaved S16_LE (else S32_LE) at 48 kHz (else the nearest rate the device has) with its
fewest channels, lets the kernel choose the period and buffer, starts, and reads whatever has
arrived, non-blocking, until about a second of samples is in.
"""

from __future__ import annotations

import ctypes
import errno as errnos
import fcntl
import os
import select
import struct

from agent.selftest.run import Busy, StreamFailed, Unusable, os_error


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("A") << 8) | nr


HW_PARAMS_SIZE, XFERI_SIZE = 608, 24
SNDRV_PCM_IOCTL_HW_REFINE = _ioc(3, 0x10, HW_PARAMS_SIZE)
SNDRV_PCM_IOCTL_HW_PARAMS = _ioc(3, 0x11, HW_PARAMS_SIZE)
SNDRV_PCM_IOCTL_HW_FREE = _ioc(0, 0x12, 0)
SNDRV_PCM_IOCTL_PREPARE = _ioc(0, 0x40, 0)
SNDRV_PCM_IOCTL_START = _ioc(0, 0x42, 0)
SNDRV_PCM_IOCTL_DROP = _ioc(0, 0x43, 0)
SNDRV_PCM_IOCTL_READI_FRAMES = _ioc(2, 0x51, XFERI_SIZE)

MASKS_AT, INTERVALS_AT, RMASK_AT = 4, 260, 512
MASK_ACCESS, MASK_FORMAT, MASK_SUBFORMAT = 0, 1, 2
IV_SAMPLE_BITS, IV_CHANNELS, IV_RATE = 0, 2, 3
ACCESS_RW_INTERLEAVED = 3
FORMATS = {"S16_LE": 2, "S32_LE": 10}
PREFERRED_RATE = 48000
CHUNK_FRAMES = 4800


class HwParams:
    """struct snd_pcm_hw_params: 3 masks of 256 bits, 12 intervals (min, max, flags)."""

    def __init__(self) -> None:
        self.buf = bytearray(HW_PARAMS_SIZE)
        for m in range(3):
            self.buf[MASKS_AT + 32 * m:MASKS_AT + 32 * (m + 1)] = b"\xff" * 32
        for i in range(12):
            struct.pack_into("<III", self.buf, INTERVALS_AT + 12 * i, 0, 0xFFFFFFFF, 0)
        struct.pack_into("<III", self.buf, RMASK_AT, 0xFFFFFFFF, 0, 0xFFFFFFFF)

    def mask_has(self, mask: int, bit: int) -> bool:
        return bool(self.buf[MASKS_AT + 32 * mask + bit // 8] & (1 << (bit % 8)))

    def set_mask(self, mask: int, bit: int) -> None:
        at = MASKS_AT + 32 * mask
        self.buf[at:at + 32] = bytes(32)
        self.buf[at + bit // 8] = 1 << (bit % 8)

    def interval(self, i: int) -> tuple[int, int]:
        lo, hi, _ = struct.unpack_from("<III", self.buf, INTERVALS_AT + 12 * i)
        return lo, hi

    def set_interval(self, i: int, value: int) -> None:
        struct.pack_into("<III", self.buf, INTERVALS_AT + 12 * i, value, value, 0x4)  # integer


class AlsaCapture:
    def __init__(self, node: str) -> None:
        self.node = node
        self.fd: int | None = None
        self.frame_bytes = 0
        self.chunk = ctypes.create_string_buffer(1)
        self.running = False

    def _ioctl(self, req: int, arg: bytearray | int, what: str) -> None:
        assert self.fd is not None
        try:
            fcntl.ioctl(self.fd, req, arg)
        except OSError as exc:
            if self.running:
                raise StreamFailed(f"{self.node}: {what}: {exc.strerror}", -(exc.errno or 0)) from None
            raise os_error(exc, what, self.node) from None

    def start(self) -> tuple[str, int, int]:
        try:
            self.fd = os.open(self.node, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise os_error(exc, "open", self.node) from None
        hw = HwParams()
        self._ioctl(SNDRV_PCM_IOCTL_HW_REFINE, hw.buf, "HW_REFINE")
        fmt = next((f for f, bit in FORMATS.items() if hw.mask_has(MASK_FORMAT, bit)), None)
        if fmt is None or not hw.mask_has(MASK_ACCESS, ACCESS_RW_INTERLEAVED):
            raise Unusable(f"{self.node}: no interleaved S16_LE or S32_LE capture")
        ch_lo, _ = hw.interval(IV_CHANNELS)
        r_lo, r_hi = hw.interval(IV_RATE)
        channels = max(1, ch_lo)
        rate = PREFERRED_RATE if r_lo <= PREFERRED_RATE <= r_hi else r_lo
        hw.set_mask(MASK_ACCESS, ACCESS_RW_INTERLEAVED)
        hw.set_mask(MASK_FORMAT, FORMATS[fmt])
        hw.set_mask(MASK_SUBFORMAT, 0)
        hw.set_interval(IV_CHANNELS, channels)
        hw.set_interval(IV_RATE, rate)
        self._ioctl(SNDRV_PCM_IOCTL_HW_PARAMS, hw.buf, "HW_PARAMS")
        self.frame_bytes = channels * (2 if fmt == "S16_LE" else 4)
        self.chunk = ctypes.create_string_buffer(CHUNK_FRAMES * self.frame_bytes)
        self._ioctl(SNDRV_PCM_IOCTL_PREPARE, 0, "PREPARE")
        self.running = True
        self._ioctl(SNDRV_PCM_IOCTL_START, 0, "START")
        return fmt, rate, channels

    def read(self, timeout: float) -> bytes:
        assert self.fd is not None
        try:
            select.select([self.fd], [], [], max(0.0, timeout))
        except OSError as exc:
            raise StreamFailed(f"{self.node}: select: {exc.strerror}", -(exc.errno or 0)) from None
        xfer = bytearray(struct.pack("<qQQ", 0, ctypes.addressof(self.chunk), CHUNK_FRAMES))
        try:
            fcntl.ioctl(self.fd, SNDRV_PCM_IOCTL_READI_FRAMES, xfer)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errnos.EPIPE:  # overrun: we were too slow, not the device; go on
                self._ioctl(SNDRV_PCM_IOCTL_PREPARE, 0, "PREPARE")
                self._ioctl(SNDRV_PCM_IOCTL_START, 0, "START")
                return b""
            if exc.errno == errnos.EBUSY:
                raise Busy(f"{self.node}: busy") from None
            raise StreamFailed(f"{self.node}: READI_FRAMES: {exc.strerror}", -(exc.errno or 0)) from None
        frames = struct.unpack_from("<q", xfer, 0)[0]
        return self.chunk.raw[:max(0, frames) * self.frame_bytes]

    def close(self) -> None:
        if self.fd is None:
            return
        for req in (SNDRV_PCM_IOCTL_DROP, SNDRV_PCM_IOCTL_HW_FREE):
            try:
                fcntl.ioctl(self.fd, req, 0)
            except OSError:
                pass
        self.running = False
        os.close(self.fd)
        self.fd = None
