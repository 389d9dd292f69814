"""The host side of the QEMU USB rig: prepare (cached), boot, talk to the guest, plug things.

A QEMU guest (software emulation) runs Debian's own kernel; configfs gadgets (a UVC camera, a
UAC2 speakerphone) are bound to usbip-vudc and plugged into the *same* kernel through vhci-hcd
over USB/IP loopback, so the guest's kernel enumerates them as real USB devices. The checkout
is shared into the guest over 9p; the guest reaches the host's 127.0.0.1 as 10.0.2.2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import stop_process

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent


class RigUnavailable(RuntimeError):
    """The machine cannot run the rig (not root, no QEMU, no package mirror)."""


def prepare() -> Path:
    if os.geteuid() != 0:
        raise RigUnavailable("the QEMU USB rig needs root (apt-get, debootstrap, 9p passthrough)")
    p = subprocess.run(["bash", str(HERE / "prepare.sh")], capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        raise RigUnavailable(f"preparing the rig failed: {p.stderr.strip().splitlines()[-1:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rig:
    def __init__(self, cache: Path, workdir: Path) -> None:
        self.cache, self.workdir = cache, workdir
        self.port = _free_port()
        self.console = workdir / "console.log"
        kv = cache.name
        args = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "1536", "-smp", "2", "-nographic", "-no-reboot",
            "-kernel", str(cache / "kernel" / "boot" / f"vmlinuz-{kv}"), "-initrd", str(cache / "initrd.img"),
            "-append", "console=ttyS0 net.ifnames=0 panic=-1 loglevel=4",
            "-fsdev", f"local,id=root,path={cache / 'root'},security_model=passthrough",
            "-device", "virtio-9p-pci,fsdev=root,mount_tag=rootfs",
            "-fsdev", f"local,id=src,path={CHECKOUT},security_model=none",
            "-device", "virtio-9p-pci,fsdev=src,mount_tag=pantau",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-10.0.2.15:7000",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.console}", "-monitor", "none", "-display", "none",
        ]
        if shutil.which("qemu-system-x86_64") is None:
            raise RigUnavailable("qemu-system-x86_64 is not installed")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(workdir / "qemu.log", "wb"))  # noqa: SIM115
        self.sock: socket.socket | None = None
        self.booted_s = self._connect(timeout=180)

    def _connect(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.console.read_text(errors='replace')[-2000:]}")
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                s.settimeout(240)
                self.sock, self.reader = s, s.makefile("rb")
                if self.call({"cmd": "sh", "script": "true"}).get("rc") == 0:
                    return time.monotonic() - t0
            except (OSError, ValueError):
                time.sleep(0.5)
        raise RuntimeError(f"the guest did not come up in {timeout:.0f} s: "
                           f"{self.console.read_text(errors='replace')[-2000:]}")

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.sock is not None
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        line = self.reader.readline()
        if not line:
            raise ConnectionError("the guest closed the command channel")
        return json.loads(line)

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        r = self.call({"cmd": "sh", "script": script, "timeout": timeout})
        if "error" in r or (check and r["rc"] != 0):
            raise RuntimeError(f"guest command failed: {script!r}: {r}")
        return str(r.get("out", ""))

    def spawn(self, name: str, script: str, log: str | None = None, env: dict[str, str] | None = None) -> int:
        r = self.call({"cmd": "spawn", "name": name, "script": script, "log": log or f"/tmp/{name}.log",
                       "env": env or {}})
        return int(r["pid"])

    def kill(self, name: str, sig: int = 15) -> Any:
        return self.call({"cmd": "kill", "name": name, "signal": sig}).get("rc")

    def dmesg(self) -> str:
        return self.sh("dmesg")

    def close(self) -> None:
        try:
            if self.sock is not None:
                self.sh("sync; echo o > /proc/sysrq-trigger", timeout=5, check=False)
        except (OSError, RuntimeError, ValueError):
            pass
        if self.sock is not None:
            self.sock.close()
        stop_process(self.proc, terminate=False)  # the guest powers itself off


class Gadget:
    """One gadget device of the rig: plug, unplug, open (as a meeting app would), break."""

    def __init__(self, rig: Rig, name: str, udc: str, vid_pid: str, serial: str) -> None:
        self.rig, self.name, self.udc, self.vid_pid, self.serial = rig, name, udc, vid_pid, serial
        self.holder: str | None = None

    @property
    def key(self) -> str:
        return f"{self.vid_pid}:{self.serial}"

    def vhci_port(self) -> str | None:
        out = self.rig.sh("usbip port 2>/dev/null", check=False)
        for m in re.finditer(r"^Port (\d+):(.*?)(?=^Port \d+:|\Z)", out, re.S | re.M):
            if f"/{self.udc}" in m.group(2):
                return m.group(1)
        return None

    def plug(self) -> None:
        # usbipd refuses an export for a moment after a device it served was detached mid-probe
        self.rig.sh(f"for i in $(seq 20); do usbip attach -r 127.0.0.1 -d {self.udc} && exit 0; sleep 1; done; "
                    f"exit 1", timeout=60)

    def unplug(self) -> None:
        port = self.vhci_port()
        if port is None:
            raise RuntimeError(f"{self.name} is not plugged")
        self.rig.sh(f"usbip detach -p {port}")

    def usb_path(self) -> str | None:
        """The kernel's name for the attached device (its port path, e.g. 3-1)."""
        out = self.rig.sh(f"grep -l '^{self.serial}$' /sys/bus/usb/devices/*/serial 2>/dev/null || true")
        for line in out.split():
            name = line.split("/")[-2]
            if re.match(r"^\d+-[\d.]+$", name):
                return name
        return None

    def nodes(self) -> list[str]:
        port = self.usb_path()
        if port is None:
            return []
        out = self.rig.sh(f"for d in /sys/class/video4linux/video* /sys/class/sound/pcmC*; do "
                          f"[ -e $d/device ] || continue; case $(readlink -f $d/device) in */{port}:*) "
                          f"echo /dev/${{d##*/}} | sed 's|/dev/pcm|/dev/snd/pcm|';; esac; done")
        return out.split()

    def open(self, process_name: str = "zoom") -> str:
        """A guest process named ``process_name`` holds the device's first node open."""
        nodes = self.nodes()
        if not nodes:
            raise RuntimeError(f"{self.name} has no device node to open")
        self.holder = f"hold-{self.name}"
        exe = f"/tmp/{process_name}"  # the kernel names a process after its executable
        self.rig.sh(f"cp -f $(readlink -f /usr/bin/python3) {exe}")
        self.rig.spawn(self.holder, f"{exe} -c \"import os,time; os.open('{nodes[0]}', os.O_RDONLY); "
                                    f"time.sleep(3600)\"")
        self.rig.sh(f"for i in $(seq 50); do ls -l /proc/*/fd 2>/dev/null | grep -q '{nodes[0]}' && exit 0; "
                    f"sleep 0.1; done; exit 1")
        return nodes[0]

    def break_(self, mode: str) -> None:
        """Camera only: its firmware (the UVC responder) now stalls every request ("stall"), answers
        after the host's 5 s timeout ("late"), or works ("ok"); replugged so the host probes anew.

        "late" gives the kernel's -110 lines (tests/data/kernel/rig-late-camera.dmesg), but the
        kernel then holds the device for minutes, and even sysfs reads of it block: no test here
        leaves the camera in that mode."""
        if self.name != "camera" or mode not in ("ok", "stall", "late"):
            raise ValueError(f"{self.name} cannot break as {mode!r}")
        self.rig.sh(f"echo {mode} > /tmp/uvc-mode")
        if self.vhci_port() is not None:
            self.unplug()
            time.sleep(1.0)
        self.plug()

    def close_holder(self) -> None:
        if self.holder:
            self.rig.kill(self.holder)
            self.holder = None


# pattern numbers of vivid's test_pattern menu (v4l2-ctl --list-ctrls-menus)
VIVID_PATTERNS = {"noise": 21, "colorbar": 0}


class StandIns:
    """Real kernel capture nodes in the guest that are not USB devices: the ``vivid`` test camera
    and the ``snd-aloop`` loopback sound card. USB/IP under QEMU does not carry the gadgets'
    isochronous streams (docs/self-test.md), so these give the self-test's measuring cases real
    V4L2 and ALSA drivers; the self-test is driven on their nodes by selftest_once.py.

    vivid's webcam input has no sensor noise of its own; its frames change only by what its
    controls put in: the OSD text (a clock and frame counters, on by default), movement, or the
    "Noise" test pattern. snd-aloop's capture side (device 1) hears what is played into its
    playback side (device 0)."""

    VIDEO_NR, CARD = 9, 7  # fixed numbers, clear of the gadgets' nodes
    VIDEO = f"/dev/video{VIDEO_NR}"
    MIC = f"/dev/snd/pcmC{CARD}D1c"
    PLAYBACK_STATUS = f"/proc/asound/card{CARD}/pcm0p/sub0/status"

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.log = ""  # the self-test's own log line(s) from the last run
        rig.sh(f"modprobe vivid n_devs=1 node_types=0x1 vid_cap_nr={self.VIDEO_NR} && "
               f"modprobe snd-aloop index={self.CARD} pcm_substreams=1")
        name = rig.sh(f"cat /sys/class/video4linux/video{self.VIDEO_NR}/name").strip()
        card = rig.sh(f"cat /proc/asound/card{self.CARD}/id").strip()
        if (name, card) != ("vivid-000-vid-cap", "Loopback"):
            raise RuntimeError(f"unexpected stand-ins: video{self.VIDEO_NR} is {name!r}, card {self.CARD} is {card!r}")

    def camera(self, pattern: str, dropped_percent: int = 0) -> None:
        """A still scene: no OSD text, no movement, no border or square; ``pattern`` fills it."""
        self.rig.sh(f"v4l2-ctl -d {self.VIDEO} -c osd_text_mode=2 -c horizontal_movement=3 "
                    f"-c vertical_movement=3 -c show_border=0 -c show_square=0 "
                    f"-c test_pattern={VIVID_PATTERNS[pattern]} -c percentage_of_dropped_buffers={dropped_percent}")

    def play(self, source: str) -> None:
        """Play ``source`` (``/dev/urandom``: noise; ``/dev/zero``: digital silence) into the loopback
        for as long as it runs; the capture side is then fixed to S16_LE, 48 kHz, mono."""
        self.rig.spawn("aplay", f"aplay -q -D hw:{self.CARD},0,0 -t raw -f S16_LE -r 48000 -c 1 {source}")
        self.rig.sh(f"for i in $(seq 100); do grep -q RUNNING {self.PLAYBACK_STATUS} && exit 0; sleep 0.1; done; "
                    f"cat /tmp/aplay.log; exit 1", timeout=30)

    def playing(self) -> bool:
        return "RUNNING" in self.rig.sh(f"cat {self.PLAYBACK_STATUS}")

    def stop_playing(self) -> None:
        self.rig.kill("aplay")
        self.rig.sh(f"for i in $(seq 100); do grep -q closed {self.PLAYBACK_STATUS} && exit 0; sleep 0.1; done; "
                    f"exit 1", timeout=30)

    def self_test(self, kind: str, node: str, first_frame_s: float = 2.0) -> list[dict[str, Any]]:
        """The events the agent's self-test produces for ``node`` (each already checked by the
        protocol's decoder in the guest)."""
        r = self.rig.call({"cmd": "sh", "timeout": 120, "script":
                           f"cd /pantau && PYTHONPATH=/pantau:/opt/pantau-py PYTHONDONTWRITEBYTECODE=1 "
                           f"python3 tests/rig/selftest_once.py {kind} {node} --first-frame-s {first_frame_s}"})
        if "error" in r or r["rc"] != 0:
            raise RuntimeError(f"the self-test in the guest failed: {r}")
        self.log = str(r["err"]).strip()
        return [json.loads(line) for line in str(r["out"]).splitlines() if line.strip()]
