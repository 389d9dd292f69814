"""The UVC gadget's userspace half: answers the host's UVC class requests on the gadget's
video node, as a camera's firmware would.

f_uvc only connects the gadget to the host once userspace subscribes to its events, and it
forwards every class request here. Mode (read from /tmp/uvc-mode for every request):
  ok    - answer probe/commit like a working camera (uvcvideo binds, /dev/videoN appears)
  stall - stall every request (uvcvideo: "Failed to query (129) UVC probe control : -32")
  late  - answer after 6 s, past the host's 5 s control timeout (-110)
"""

from __future__ import annotations

import fcntl
import glob
import os
import select
import struct
import sys
import time


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


VIDIOC_DQEVENT = _ioc(2, "V", 89, 136)
VIDIOC_SUBSCRIBE_EVENT = _ioc(1, "V", 90, 32)
UVCIOC_SEND_RESPONSE = _ioc(1, "U", 1, 64)
EVENT_BASE = 0x08000000
CONNECT, DISCONNECT, STREAMON, STREAMOFF, SETUP, DATA = (EVENT_BASE + i for i in range(6))
EL2HLT = 51
GET_CUR, GET_MIN, GET_MAX, GET_RES, GET_LEN, GET_INFO, GET_DEF = 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87
SET_CUR = 0x01
PROBE, COMMIT = 1, 2
STREAMING_INTERFACE = 1


def probe_control(length: int) -> bytes:
    frame = 640 * 360 * 2
    body = struct.pack("<HBBIHHHHHII", 1, 1, 1, 333333, 0, 0, 0, 0, 0, frame, 1024)
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


def mode() -> str:
    try:
        with open("/tmp/uvc-mode") as fh:
            return fh.read().strip() or "ok"
    except OSError:
        return "ok"


def main() -> None:
    fd = os.open(gadget_node(), os.O_RDWR | os.O_NONBLOCK)
    for ev in (CONNECT, DISCONNECT, STREAMON, STREAMOFF, DATA, SETUP):  # SETUP last: it connects
        fcntl.ioctl(fd, VIDIOC_SUBSCRIBE_EVENT, struct.pack("<III20x", ev, 0, 0))
    print("uvc_responder: subscribed", flush=True)
    length = 26
    while True:
        select.select([], [], [fd])
        buf = bytearray(136)
        try:
            fcntl.ioctl(fd, VIDIOC_DQEVENT, buf)
        except BlockingIOError:
            continue
        etype = struct.unpack_from("<I", buf, 0)[0]
        if etype != SETUP:
            continue
        rtype, req, value, index, wlen = struct.unpack_from("<BBHHH", buf, 8)
        m = mode()
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
            respond(fd, b"\0" * wlen)  # accept the data stage; the DATA event follows
        elif req in (GET_CUR, GET_MIN, GET_MAX, GET_DEF):
            length = wlen
            respond(fd, probe_control(wlen))
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
