"""Linux camera capture through V4L2, in pure Python: ioctl, mmap, struct (x86-64/aarch64 layouts).

Opens the node non-blocking, picks the smallest frame size of a format it can measure (YUYV,
UYVY, GREY, MJPEG; YUYV first on a tie), streams with four mmap buffers, and hands each frame
over as bytes to the meter, which keeps none of them. Every step that fails says which.
"""

from __future__ import annotations

import errno as errnos
import fcntl
import mmap
import os
import select
import struct

from agent.selftest.run import Busy, StreamFailed, Unusable, os_error


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("V") << 8) | nr


R, W, RW = 2, 1, 3
CAP_SIZE, FMTDESC_SIZE, FORMAT_SIZE, REQBUFS_SIZE, BUFFER_SIZE, FRMSIZE_SIZE = 104, 64, 208, 20, 88, 44
VIDIOC_QUERYCAP = _ioc(R, 0, CAP_SIZE)
VIDIOC_ENUM_FMT = _ioc(RW, 2, FMTDESC_SIZE)
VIDIOC_S_FMT = _ioc(RW, 5, FORMAT_SIZE)
VIDIOC_REQBUFS = _ioc(RW, 8, REQBUFS_SIZE)
VIDIOC_QUERYBUF = _ioc(RW, 9, BUFFER_SIZE)
VIDIOC_QBUF = _ioc(RW, 15, BUFFER_SIZE)
VIDIOC_DQBUF = _ioc(RW, 17, BUFFER_SIZE)
VIDIOC_STREAMON = _ioc(W, 18, 4)
VIDIOC_STREAMOFF = _ioc(W, 19, 4)
VIDIOC_ENUM_FRAMESIZES = _ioc(RW, 74, FRMSIZE_SIZE)

BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP = 1, 1
CAP_VIDEO_CAPTURE, CAP_STREAMING, CAP_DEVICE_CAPS = 0x1, 0x04000000, 0x80000000
BUF_FLAG_ERROR = 0x40
FRMSIZE_DISCRETE = 1
PREFERENCE = ("YUYV", "UYVY", "YVYU", "VYUY", "GREY", "MJPG", "JPEG")
N_BUFFERS = 4


def fourcc_str(v: int) -> str:
    return struct.pack("<I", v).decode("latin-1")


def fourcc_int(s: str) -> int:
    return int(struct.unpack("<I", s.encode("latin-1"))[0])


def pick_format(sizes: list[tuple[str, int, int]]) -> tuple[str, int, int] | None:
    """The smallest (width x height) among measurable formats; YUYV first, MJPEG last on a tie."""
    usable = [s for s in sizes if s[0] in PREFERENCE]
    if not usable:
        return None
    return min(usable, key=lambda s: (s[1] * s[2], PREFERENCE.index(s[0])))


class V4l2Capture:
    """Tries the nodes in order; the first that is a streaming capture node is used."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        self.fd: int | None = None
        self.node = nodes[0] if nodes else ""
        self.maps: list[mmap.mmap] = []
        self.streaming = False
        self.damaged = 0

    # ------------------------------------------------------------------ set-up
    def start(self) -> tuple[str, int, int]:
        last: Exception = Unusable("no video node")
        for node in self.nodes:
            try:
                return self._start(node)
            except Unusable as exc:
                self.close()
                last = exc
        raise last

    def _ioctl(self, req: int, buf: bytearray, what: str) -> None:
        assert self.fd is not None
        try:
            fcntl.ioctl(self.fd, req, buf)
        except OSError as exc:
            raise (os_error(exc, what, self.node) if not self.streaming else
                   StreamFailed(f"{self.node}: {what}: {exc.strerror}", -(exc.errno or 0))) from None

    def _start(self, node: str) -> tuple[str, int, int]:
        self.node = node
        try:
            self.fd = os.open(node, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise os_error(exc, "open", node) from None
        cap = bytearray(CAP_SIZE)
        self._ioctl(VIDIOC_QUERYCAP, cap, "VIDIOC_QUERYCAP")
        caps, dev_caps = struct.unpack_from("<II", cap, 84)
        if caps & CAP_DEVICE_CAPS:
            caps = dev_caps
        if not caps & CAP_VIDEO_CAPTURE or not caps & CAP_STREAMING:
            raise Unusable(f"{node}: not a streaming video capture node")
        choice = pick_format(self._sizes())
        if choice is None:
            raise Unusable(f"{node}: no format the self-test can measure")
        fourcc, width, height = self._set_format(*choice)
        self._buffers()
        self._ioctl(VIDIOC_STREAMON, bytearray(struct.pack("<I", BUF_TYPE_VIDEO_CAPTURE)), "VIDIOC_STREAMON")
        self.streaming = True
        return fourcc, width, height

    def _sizes(self) -> list[tuple[str, int, int]]:
        out = []
        for i in range(64):
            desc = bytearray(struct.pack("<III", i, BUF_TYPE_VIDEO_CAPTURE, 0).ljust(FMTDESC_SIZE, b"\0"))
            try:
                self._ioctl(VIDIOC_ENUM_FMT, desc, "VIDIOC_ENUM_FMT")
            except Unusable:
                break  # EINVAL ends the list
            pixfmt = struct.unpack_from("<I", desc, 44)[0]
            for j in range(64):
                fs = bytearray(struct.pack("<II", j, pixfmt).ljust(FRMSIZE_SIZE, b"\0"))
                try:
                    self._ioctl(VIDIOC_ENUM_FRAMESIZES, fs, "VIDIOC_ENUM_FRAMESIZES")
                except Unusable:
                    break
                kind, w, h = struct.unpack_from("<III", fs, 8)
                if kind != FRMSIZE_DISCRETE:  # stepwise/continuous: min_width, max_width, step, min_height
                    w, h = struct.unpack_from("<I", fs, 12)[0], struct.unpack_from("<I", fs, 24)[0]
                out.append((fourcc_str(pixfmt), w, h))
                if kind != FRMSIZE_DISCRETE:
                    break
        return out

    def _set_format(self, fourcc: str, width: int, height: int) -> tuple[str, int, int]:
        fmt = bytearray(FORMAT_SIZE)
        struct.pack_into("<I", fmt, 0, BUF_TYPE_VIDEO_CAPTURE)
        struct.pack_into("<IIII", fmt, 8, width, height, fourcc_int(fourcc), 0)
        self._ioctl(VIDIOC_S_FMT, fmt, "VIDIOC_S_FMT")
        w, h, pf = struct.unpack_from("<III", fmt, 8)
        return fourcc_str(pf), w, h

    def _buffers(self) -> None:
        assert self.fd is not None
        req = bytearray(struct.pack("<III", N_BUFFERS, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP).ljust(REQBUFS_SIZE, b"\0"))
        self._ioctl(VIDIOC_REQBUFS, req, "VIDIOC_REQBUFS")
        count = struct.unpack_from("<I", req, 0)[0]
        if count < 1:
            raise StreamFailed(f"{self.node}: the driver gave no buffers")
        for i in range(count):
            buf = self._buf(i)
            self._ioctl(VIDIOC_QUERYBUF, buf, "VIDIOC_QUERYBUF")
            offset, length = struct.unpack_from("<I", buf, 64)[0], struct.unpack_from("<I", buf, 72)[0]
            try:
                self.maps.append(mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset))
            except OSError as exc:
                raise os_error(exc, "mmap", self.node) from None
            self._ioctl(VIDIOC_QBUF, self._buf(i), "VIDIOC_QBUF")

    @staticmethod
    def _buf(index: int) -> bytearray:
        buf = bytearray(BUFFER_SIZE)
        struct.pack_into("<II", buf, 0, index, BUF_TYPE_VIDEO_CAPTURE)
        struct.pack_into("<I", buf, 60, MEMORY_MMAP)
        return buf

    # ------------------------------------------------------------------ frames
    def next_frame(self, timeout: float) -> bytes | None:
        """One frame, or None if none came within ``timeout`` (or the driver flagged it damaged)."""
        assert self.fd is not None
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except OSError as exc:
            raise StreamFailed(f"{self.node}: select: {exc.strerror}", -(exc.errno or 0)) from None
        if not ready:
            return None
        buf = self._buf(0)
        try:
            fcntl.ioctl(self.fd, VIDIOC_DQBUF, buf)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errnos.EBUSY:
                raise Busy(f"{self.node}: busy") from None
            raise StreamFailed(f"{self.node}: VIDIOC_DQBUF: {exc.strerror}", -(exc.errno or 0)) from None
        index, _type, used, flags = struct.unpack_from("<IIII", buf, 0)
        frame = None if flags & BUF_FLAG_ERROR or used == 0 else bytes(self.maps[index][:used])
        self._ioctl(VIDIOC_QBUF, self._buf(index), "VIDIOC_QBUF")
        self.damaged += frame is None
        return frame

    def close(self) -> None:
        if self.fd is None:
            return
        if self.streaming:
            try:
                fcntl.ioctl(self.fd, VIDIOC_STREAMOFF, struct.pack("<I", BUF_TYPE_VIDEO_CAPTURE))
            except OSError:
                pass
            self.streaming = False
        for m in self.maps:
            m.close()
        self.maps = []
        try:
            fcntl.ioctl(self.fd, VIDIOC_REQBUFS,
                        bytearray(struct.pack("<III", 0, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP).ljust(REQBUFS_SIZE,
                                                                                                   b"\0")))
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
