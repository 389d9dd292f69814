"""The UVC gadget's userspace half: answers the host's UVC class requests on the gadget's
video node, as a camera's firmware would, and feeds it frames while the host streams.

f_uvc only connects the gadget to the host once userspace subscribes to its events, and it
forwards every class request here. Mode (read from /tmp/uvc-mode for every request):
  ok    - answer probe/commit like a working camera (uvcvideo binds, /dev/videoN appears)
  stall - stall every request (uvcvideo: "Failed to query (129) UVC probe control : -32")
  late  - answer after 6 s, past the host's 5 s control timeout (-110)
Frames (read from /tmp/uvc-frames each time the host starts streaming):
  live   - a scene with sensor noise: every frame differs
  frozen - the same frame over and over, byte for byte
  none   - the stream starts but no frame is ever sent (a dead sensor)
The host picks the frame size by probe/commit; the answer echoes the frame it asked for.
"""

from __future__ import annotations

import fcntl
import glob
import mmap
import os
import random
import select
import struct
import sys
import time


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


VIDIOC_DQEVENT = _ioc(2, "V", 89, 136)
VIDIOC_SUBSCRIBE_EVENT = _ioc(1, "V", 90, 32)
VIDIOC_S_FMT = _ioc(3, "V", 5, 208)
VIDIOC_REQBUFS = _ioc(3, "V", 8, 20)
VIDIOC_QUERYBUF = _ioc(3, "V", 9, 88)
VIDIOC_QBUF = _ioc(3, "V", 15, 88)
VIDIOC_DQBUF = _ioc(3, "V", 17, 88)
VIDIOC_STREAMON = _ioc(1, "V", 18, 4)
VIDIOC_STREAMOFF = _ioc(1, "V", 19, 4)
UVCIOC_SEND_RESPONSE = _ioc(1, "U", 1, 64)
EVENT_BASE = 0x08000000
CONNECT, DISCONNECT, STREAMON, STREAMOFF, SETUP, DATA = (EVENT_BASE + i for i in range(6))
EL2HLT = 51
GET_CUR, GET_MIN, GET_MAX, GET_RES, GET_LEN, GET_INFO, GET_DEF = 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87
SET_CUR = 0x01
PROBE, COMMIT = 1, 2
STREAMING_INTERFACE = 1
OUTPUT, MMAP = 2, 1
YUYV = struct.unpack("<I", b"YUYV")[0]
FRAME_DIR = "/sys/kernel/config/usb_gadget/camera/functions/uvc.0/streaming/uncompressed/u"


def frames() -> dict[int, tuple[int, int]]:
    """bFrameIndex -> (width, height), from the gadget's configfs (creation order: 360p, 120p)."""
    out = {}
    for i, name in enumerate(("360p", "120p"), start=1):
        d = os.path.join(FRAME_DIR, name)
        if os.path.isdir(d):
            with open(os.path.join(d, "wWidth")) as w, open(os.path.join(d, "wHeight")) as h:
                out[i] = (int(w.read()), int(h.read()))
    return out or {1: (640, 360)}


FRAMES = frames()


def probe_control(length: int, frame: int) -> bytes:
    w, h = FRAMES[frame]
    body = struct.pack("<HBBIHHHHHII", 1, 1, frame, 333333, 0, 0, 0, 0, 0, w * h * 2, 1024)
    if length > 26:  # UVC 1.1 fields
        body += struct.pack("<IBBBB", 48_000_000, 3, 0, 0, 0)
    return body[:length].ljust(length, b"\0")


def gadget_node() -> str:
    for name in sorted(glob.glob("/sys/class/video4linux/video*/name")):
        with open(name) as fh:
            if "vudc" in fh.read():
                return "/dev/" + name.split("/")[-2]
    sys.exit("uvc_responder: no gadget video node")


def respond(fd: int, data: bytes | None) -> None:
    length = -EL2HLT if data is None else len(data)
    fcntl.ioctl(fd, UVCIOC_SEND_RESPONSE, struct.pack("<i60s", length, (data or b"")[:60]))


def answer_unit_control(fd: int, req: int, wlen: int) -> None:
    """Controls of the camera terminal and processing unit: supported, get/set, value 0."""
    if req == GET_INFO:
        respond(fd, b"\x03")
    elif req == GET_LEN:
        respond(fd, struct.pack("<H", wlen))
    elif req in (GET_MAX, GET_RES):
        respond(fd, b"\x01".ljust(wlen, b"\0"))
    else:  # SET_CUR, GET_CUR, GET_MIN, GET_DEF
        respond(fd, b"\0" * wlen)


def setting(path: str, default: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip() or default
    except OSError:
        return default


def _buf(index: int, used: int = 0) -> bytearray:
    b = bytearray(88)
    struct.pack_into("<III", b, 0, index, OUTPUT, used)
    struct.pack_into("<I", b, 60, MMAP)
    return b


class Stream:
    """The gadget's OUTPUT queue while the host streams: frames as /tmp/uvc-frames says."""

    def __init__(self, fd: int, frame: int) -> None:
        self.fd, self.maps, self.n = fd, [], 0
        self.kind = setting("/tmp/uvc-frames", "live")
        w, h = FRAMES[frame]
        self.size = w * h * 2
        fmt = bytearray(208)
        struct.pack_into("<I", fmt, 0, OUTPUT)
        struct.pack_into("<IIIIII", fmt, 8, w, h, YUYV, 1, w * 2, self.size)
        fcntl.ioctl(fd, VIDIOC_S_FMT, fmt)
        req = bytearray(struct.pack("<III", 4, OUTPUT, MMAP).ljust(20, b"\0"))
        fcntl.ioctl(fd, VIDIOC_REQBUFS, req)
        rng = random.Random(1)
        self.scene = rng.randbytes(self.size)
        self.noise = rng.randbytes(self.size * 2)
        for i in range(struct.unpack_from("<I", req, 0)[0]):
            b = _buf(i)
            fcntl.ioctl(fd, VIDIOC_QUERYBUF, b)
            offset, length = struct.unpack_from("<I", b, 64)[0], struct.unpack_from("<I", b, 72)[0]
            self.maps.append(mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset))
            if self.kind != "none":
                self.queue(i)
        fcntl.ioctl(fd, VIDIOC_STREAMON, struct.pack("<I", OUTPUT))
        print(f"uvc_responder: streaming {w}x{h} {self.kind}", flush=True)

    def queue(self, i: int) -> None:
        if self.kind == "live":
            k = (self.n * 7919) % self.size
            self.maps[i][:self.size] = self.noise[k:k + self.size]
        else:
            self.maps[i][:self.size] = self.scene
        self.n += 1
        fcntl.ioctl(self.fd, VIDIOC_QBUF, _buf(i, self.size))

    def refill(self) -> None:
        b = _buf(0)
        try:
            fcntl.ioctl(self.fd, VIDIOC_DQBUF, b)
        except OSError:
            return
        self.queue(struct.unpack_from("<I", b, 0)[0])

    def stop(self) -> None:
        try:
            fcntl.ioctl(self.fd, VIDIOC_STREAMOFF, struct.pack("<I", OUTPUT))
        except OSError:
            pass
        for m in self.maps:
            m.close()
        try:
            fcntl.ioctl(self.fd, VIDIOC_REQBUFS, bytearray(struct.pack("<III", 0, OUTPUT, MMAP).ljust(20, b"\0")))
        except OSError:
            pass
        print(f"uvc_responder: stopped after {self.n} frames queued", flush=True)


def main() -> None:
    fd = os.open(gadget_node(), os.O_RDWR | os.O_NONBLOCK)
    for ev in (CONNECT, DISCONNECT, STREAMON, STREAMOFF, DATA, SETUP):  # SETUP last: it connects
        fcntl.ioctl(fd, VIDIOC_SUBSCRIBE_EVENT, struct.pack("<III20x", ev, 0, 0))
    print("uvc_responder: subscribed", flush=True)
    length = 26
    frame = committed = 1
    pending: int | None = None  # the control a SET_CUR's data stage is for
    stream: Stream | None = None
    while True:
        busy = stream is not None and stream.kind != "none"
        _, writable, _ = select.select([], [fd] if busy else [], [fd])
        if writable and stream is not None:
            try:
                stream.refill()
            except OSError as exc:  # the host went (unplugged, or the USB/IP link dropped)
                print(f"uvc_responder: streaming ended: {exc}", flush=True)
                stream.stop()
                stream = None
        buf = bytearray(136)
        try:
            fcntl.ioctl(fd, VIDIOC_DQEVENT, buf)
        except BlockingIOError:
            continue
        etype = struct.unpack_from("<I", buf, 0)[0]
        if etype == STREAMON:
            if stream is not None:
                stream.stop()
            try:
                stream = Stream(fd, committed)
            except OSError as exc:
                print(f"uvc_responder: cannot stream: {exc}", flush=True)
                stream = None
            continue
        if etype in (STREAMOFF, DISCONNECT):
            if stream is not None:
                stream.stop()
                stream = None
            continue
        if etype == DATA:
            data = bytes(buf[12:12 + max(0, struct.unpack_from("<i", buf, 8)[0])])
            if pending in (PROBE, COMMIT) and len(data) >= 4 and data[3] in FRAMES:
                frame = data[3]
                if pending == COMMIT:
                    committed = frame
            continue
        if etype != SETUP:
            continue
        rtype, req, value, index, wlen = struct.unpack_from("<BBHHH", buf, 8)
        m = setting("/tmp/uvc-mode", "ok")
        print(f"uvc_responder: setup type={rtype:#x} req={req:#x} value={value:#x} index={index:#x} len={wlen} "
              f"mode={m}", flush=True)
        if m == "late":
            time.sleep(6)
        if m == "stall":
            respond(fd, None)
            continue
        if (index & 0xFF) != STREAMING_INTERFACE:
            answer_unit_control(fd, req, wlen)  # camera terminal / processing unit controls
            continue
        if (value >> 8) not in (PROBE, COMMIT):
            respond(fd, None)
            continue
        if req == SET_CUR:
            pending = value >> 8
            respond(fd, b"\0" * wlen)  # accept the data stage; the DATA event follows
        elif req in (GET_CUR, GET_MIN, GET_MAX, GET_DEF):
            length = wlen
            respond(fd, probe_control(wlen, frame if req == GET_CUR else 1))
        elif req == GET_LEN:
            respond(fd, struct.pack("<H", length))
        elif req == GET_INFO:
            respond(fd, b"\x03")
        elif req == GET_RES:
            respond(fd, b"\0" * wlen)
        else:
            respond(fd, None)


if __name__ == "__main__":
    main()
