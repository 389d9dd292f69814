"""The self-test never opens a device node another process holds, and lets go at once when one
opens it mid-test. Real processes hold real files standing in for the nodes; whether the agent
opened a file is seen by the kernel (inotify IN_OPEN), whether it still holds one in /proc."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from agent.config import load
from agent.runner import Observer, make_scheduler
from agent.selftest.alsa import AlsaCapture
from agent.selftest.run import SelfTest, Settings, run
from agent.selftest.v4l2 import V4l2Capture

IN_OPEN = 0x20
HOLD = "import sys, time; f = open(sys.argv[1], 'rb'); print('held', flush=True); time.sleep(60)"


class OpenWatch:
    """Counts opens of one file, as the kernel reports them."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN) < 0:
            pytest.fail(f"inotify unavailable: errno {ctypes.get_errno()}")

    def opens(self) -> int:
        n = 0
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return n
            at = 0
            while at < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, at)
                n += bool(mask & IN_OPEN)
                at += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def hold(path: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def we_hold(path: Path) -> bool:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_a_held_node_is_never_opened(tmp_path: Path, kind: str) -> None:
    node = tmp_path / ("video3" if kind == "video" else "pcmC3D0c")
    node.write_bytes(b"")
    other = tmp_path / "pcmC3D0p"  # another node of the same device: holding it makes the device busy too
    other.write_bytes(b"")
    opener = partial(V4l2Capture, [str(node)]) if kind == "video" else partial(AlsaCapture, str(node))
    test = SelfTest(kind, str(node), opener, [str(node), str(other)])
    watch = OpenWatch(node)
    try:
        for held in (node, other):
            holder = hold(held)
            try:
                watch.opens()  # the holder's own open
                res = run(test, Settings())
                assert (res.outcome, res.code) == ("busy", None) and "python" in res.message
                assert watch.opens() == 0  # the kernel saw nobody else open it
            finally:
                holder.kill()
                holder.wait()
        # control: with nobody holding it the test does open it (a plain file is no V4L2/ALSA node:
        # the test is skipped, no event, no error)
        res = run(test, Settings())
        assert watch.opens() == 1 and res.outcome == "skipped" and res.code is None
        assert not we_hold(node)
    finally:
        watch.close()


def test_lets_go_when_someone_opens_the_device_mid_test(tmp_path: Path) -> None:
    node = tmp_path / "video4"
    node.write_bytes(b"")
    bus = tmp_path / "bus.json"
    cam = {"vid": "046d", "pid": "085e", "serial": "C1", "kind": "camera", "port": "1-2", "nodes": [str(node)]}
    bus.write_text(json.dumps({"devices": [cam]}))
    cfg = load(env={}, usb_backend="simulated", simulated_bus=str(bus), state_dir=str(tmp_path),
               self_test_frames=900, self_test_settle_s=1, self_test_retry_s=120)  # 30 s of frames
    obs = Observer(cfg)
    sched = make_scheduler(cfg, obs.platform, threading.Event())
    assert sched is not None
    clock = [1000.0]
    sched.clock = lambda: clock[0]
    t = obs.look()
    sched.attached([t.devices[0]["key"]])
    clock[0] += 1
    sched.tick(t, obs.nodes)
    assert sched.worker is not None
    deadline = time.monotonic() + 10
    while not we_hold(node) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert we_hold(node), "the self-test did not open the stand-in node"
    time.sleep(0.3)  # well into streaming
    holder = hold(node)
    t0 = time.monotonic()
    try:
        while we_hold(node) and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        let_go_s = time.monotonic() - t0
        sched.worker.join(5)
        print(f"\nself-test let go of the node {let_go_s * 1000:.0f} ms after another process opened it")
        assert not we_hold(node) and let_go_s < 0.5
        assert sched.events() == []  # an interrupted test is no result
        assert sched.due[t.devices[0]["key"]] == (clock[0] + 120, "retry")
        # while the meeting app holds it, the retry waits; the observer does not count us as a user
        clock[0] += 120
        t = obs.look()
        assert t.usage[t.devices[0]["key"]].in_use
        sched.tick(t, obs.nodes)
        assert sched.worker.is_alive() is False and sched.events() == []
    finally:
        holder.kill()
        holder.wait()
    t = obs.look()
    assert not t.usage[t.devices[0]["key"]].in_use
    sched.settings.frames = 5
    sched.tick(t, obs.nodes)
    assert not sched.worker.is_alive()  # and never sooner than the minimum interval after the last try
    clock[0] += 600
    sched.tick(t, obs.nodes)
    sched.worker.join(10)
    [ev] = sched.events()
    assert (ev["type"], ev["context"]["trigger"], ev["context"]["result"]) == ("device.self_test", "retry", "pass")
    assert ev["context"]["node"] == str(node) and not we_hold(node)
