"""Who uses the camera and microphone on Windows: the CapabilityAccessManager ConsentStore.

Windows records, per app and capability (``webcam``, ``microphone``), ``LastUsedTimeStart`` and
``LastUsedTimeStop`` (FILETIME); a stop of 0 means the app is using it now. Entries are checked
against running processes, since a crashed app can leave a stop of 0 behind. The agent runs as a
service, so it reads every loaded user hive (``HKEY_USERS\\<SID>``), not its own HKCU.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

KEY = r"Software\Microsoft\Windows\CurrentVersion\CapabilityAccessManager\ConsentStore"
CAPABILITY_KINDS = {"webcam": ("camera",), "microphone": ("speakerphone", "microphone")}
_KEY_RE = re.compile(r"^HKEY_\S+\\ConsentStore\\(?P<cap>webcam|microphone)\\(?P<rest>.+)$", re.IGNORECASE)
_VAL_RE = re.compile(r"^\s+(LastUsedTimeStart|LastUsedTimeStop)\s+REG_QWORD\s+0x([0-9a-fA-F]+)\s*$")


@dataclass(frozen=True, slots=True)
class ConsentUse:
    capability: str  # webcam | microphone
    app: str  # executable name for desktop apps, package family name for store apps
    in_use: bool


def parse_reg_query(text: str) -> list[ConsentUse]:
    """Parse ``reg query <hive>\\...\\ConsentStore /s`` output."""
    out: list[ConsentUse] = []
    cap = app = None
    start = stop = None

    def flush() -> None:
        if cap and app and start is not None:
            out.append(ConsentUse(cap, app, start != 0 and stop == 0))

    for line in text.splitlines():
        m = _KEY_RE.match(line.strip())
        if m:
            flush()
            cap, rest = m.group("cap").lower(), m.group("rest")
            parts = rest.split("\\")
            if parts[0].lower() == "nonpackaged" and len(parts) > 1:
                app = parts[1].replace("#", "\\").rsplit("\\", 1)[-1]  # C:#Program Files#Zoom#bin#Zoom.exe
            elif parts[0].lower() != "nonpackaged":
                app = parts[0]
            else:
                app = None
            start = stop = None
            continue
        v = _VAL_RE.match(line)
        if v and cap:
            value = int(v.group(2), 16)
            if v.group(1) == "LastUsedTimeStart":
                start = value
            else:
                stop = value
    flush()
    return out


def users_by_kind(uses: Iterable[ConsentUse], running: Iterable[str]) -> dict[str, list[str]]:
    """Device kind -> names of running apps using that capability now."""
    alive = {r.lower() for r in running}
    found: dict[str, set[str]] = {}
    for u in uses:
        if not u.in_use:
            continue
        exe = u.app.lower()
        if exe.endswith(".exe") and exe not in alive:
            continue  # a stale entry left by an app that is gone
        for kind in CAPABILITY_KINDS[u.capability]:
            found.setdefault(kind, set()).add(u.app)
    return {k: sorted(v) for k, v in found.items()}


def query(timeout: float = 10.0) -> list[ConsentUse]:  # pragma: no cover - Windows only
    hives = subprocess.run(["reg", "query", "HKU"], capture_output=True, text=True, timeout=timeout).stdout.split()
    uses: list[ConsentUse] = []
    for hive in (h for h in hives if h.upper().startswith("HKEY_USERS\\S-1-5-21") and not h.endswith("_Classes")):
        out = subprocess.run(["reg", "query", f"{hive}\\{KEY}", "/s"], capture_output=True, text=True,
                             timeout=timeout)
        uses += parse_reg_query(out.stdout)
    return uses
