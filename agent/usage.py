"""Is a device in use, by whom, and is a meeting on?

Linux: a process holding a device node shows as a ``/proc/<pid>/fd`` link to it (psutil's
``open_files()`` omits device nodes, so the links are read directly). Device nodes are
matched to USB devices through sysfs, never by globbing ``/dev``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Collection, Iterable

import psutil

DEFAULT_MEETING_PROCESSES = ("CptHost.exe",) if os.name == "nt" else ("zoom",)


def holders(nodes: Iterable[str], proc_root: str = "/proc",
            exclude_pids: Collection[int] = ()) -> dict[str, list[str]]:
    """node path -> names of processes holding it open (``(deleted)`` links included), leaving out
    the processes in ``exclude_pids``."""
    wanted = {os.path.realpath(n) for n in nodes} | set(nodes)
    found: dict[str, list[str]] = {}
    if not wanted:
        return found
    try:
        skip = {str(p) for p in exclude_pids}
        pids = [p for p in os.listdir(proc_root) if p.isdigit() and p not in skip]
    except OSError:
        return found
    for pid in pids:
        fd_dir = os.path.join(proc_root, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            target = target.removesuffix(" (deleted)")
            if target in wanted:
                found.setdefault(target, [])
                name = _proc_name(proc_root, pid)
                if name not in found[target]:
                    found[target].append(name)
    return found


def _proc_name(proc_root: str, pid: str) -> str:
    try:
        with open(os.path.join(proc_root, pid, "comm"), encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or pid
    except OSError:
        return pid


def device_nodes(port: str, sysfs_root: str = "/sys", dev_root: str = "/dev") -> list[str]:
    """``/dev/videoN`` and ``/dev/snd/pcmC*`` nodes that belong to the USB device on ``port``."""
    nodes = []
    for link in glob.glob(os.path.join(sysfs_root, "class/video4linux/video*/device")):
        if _belongs(link, port):
            nodes.append(os.path.join(dev_root, os.path.basename(os.path.dirname(link))))
    for link in glob.glob(os.path.join(sysfs_root, "class/sound/card*/device")):
        if _belongs(link, port):
            card = os.path.basename(os.path.dirname(link))[4:]
            nodes += sorted(glob.glob(os.path.join(dev_root, f"snd/pcmC{card}D*")))
    return nodes


def _belongs(link: str, port: str) -> bool:
    """The interface dir a class device points to is ``<port>:<cfg>.<intf>``."""
    try:
        target = os.path.realpath(link)
    except OSError:
        return False
    return os.path.basename(target).split(":")[0] == port


def meeting_running(names: Iterable[str]) -> bool:
    wanted = {n.lower() for n in names}
    for p in psutil.process_iter(["name"]):
        name = (p.info.get("name") or "").lower()
        if name in wanted:
            return True
    return False
