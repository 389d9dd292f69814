"""Find the port of a kernel signal whose line named no port, through sysfs.

Old snd-usb-audio lines name the USB device number and interface (``4:1:1: usb_set_interface
failed``): the port is the device under ``bus/usb/devices`` whose ``devnum`` matches and which has
an audio interface (class 01) of that number. Device numbers repeat across buses, so a number
that fits more than one device resolves to nothing rather than to a guess. A line that names no
device at all (``cannot submit urb (err = -18)``) resolves only where the host has exactly one USB
sound card (``class/sound/card*/device``).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import replace

from agent.signals.kmsg import Signal

_PORT = re.compile(r"\d+-\d+(?:\.\d+)*")
AUDIO_CLASS = 0x01


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read(64).strip()
    except OSError:
        return None


def _int(text: str | None, base: int = 10) -> int | None:
    try:
        return int(text, base) if text is not None else None
    except ValueError:
        return None


def port_for_devnum(devnum: int, iface: int | None, sysfs_root: str) -> str | None:
    base = os.path.join(sysfs_root, "bus", "usb", "devices")
    try:
        names = os.listdir(base)
    except OSError:
        return None
    found = []
    for name in names:
        if not _PORT.fullmatch(name) or _int(_read(os.path.join(base, name, "devnum"))) != devnum:
            continue
        if iface is None or _has_audio_interface(base, names, name, iface):
            found.append(name)
    return found[0] if len(found) == 1 else None


def _has_audio_interface(base: str, names: list[str], port: str, iface: int) -> bool:
    for name in names:
        if not name.startswith(port + ":"):
            continue
        d = os.path.join(base, name)
        if (_int(_read(os.path.join(d, "bInterfaceNumber")), 16) == iface
                and _int(_read(os.path.join(d, "bInterfaceClass")), 16) == AUDIO_CLASS):
            return True
    return False


def only_usb_sound_card(sysfs_root: str) -> str | None:
    ports = set()
    for link in glob.glob(os.path.join(sysfs_root, "class", "sound", "card*", "device")):
        target = os.path.basename(os.path.realpath(link)).split(":")[0]
        if _PORT.fullmatch(target):
            ports.add(target)
    return ports.pop() if len(ports) == 1 else None


def resolve(signals: Iterable[Signal], sysfs_root: str) -> list[Signal]:
    """The signals, with a port filled in where sysfs tells it unambiguously."""
    out = []
    for s in signals:
        if s.port is None and s.code.startswith("audio."):
            port = (port_for_devnum(s.devnum, s.iface, sysfs_root) if s.devnum is not None
                    else only_usb_sound_card(sysfs_root))
            if port is not None:
                s = replace(s, port=port)
        out.append(s)
    return out
