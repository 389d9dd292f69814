"""Handling reports handed from ``pantau-agent report-handling`` to the agent.

The command writes one JSON file per report into ``<state_dir>/reports/`` (temporary file, fsync,
rename, so the agent never sees half a report); the agent picks the files up each tick, in the
order they were written, and sends each as its own next event (its boot, its next ``seq``). The
file goes only after the outbox says the event is safely queued (``Outbox.token_state``: the
report's id is stored in the same transaction as the event), so a crash at any point neither loses
a report nor sends it twice. With no agent running the files wait for the next start.

On POSIX, ``reported_by`` is the owner of the report file (the user who ran the command); root may
name someone else (``sudo`` records ``$SUDO_USER``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from agent.state import write_atomic
from common.protocol import now_ts

log = logging.getLogger(__name__)
REPORTS_DIR = "reports"
MAX_NOTE_CHARS = 500
_NAME = re.compile(r"\d{19,20}-[0-9a-f]{8}\.json")
# vid:pid:serial or vid:pid@port, as `pantau-agent once` prints them
_KEY = re.compile(r"[0-9a-f]{4}:[0-9a-f]{4}(?::[^\x00-\x1f\x7f]{1,255}|@\d+-\d+(?:\.\d+)*)")


class ReportError(ValueError):
    """A report that cannot be accepted; the message is one line for the person who typed it."""


@dataclass(frozen=True, slots=True)
class Report:
    id: str
    path: str
    key: str
    note: str
    reported_by: str
    reported_at: str


def reports_dir(state_dir: str) -> str:
    return os.path.join(state_dir, REPORTS_DIR)


def check(key: str, note: str) -> tuple[str, str]:
    """The key and note as they will be sent; ``ReportError`` with one line if they cannot be."""
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ReportError(f"device key {key[:80]!r} is not vid:pid:serial or vid:pid@port "
                          "(see `pantau-agent once`)")
    note = note.strip()
    if not note:
        raise ReportError("--note must say what happened")
    if len(note) > MAX_NOTE_CHARS:
        raise ReportError(f"--note is {len(note)} characters; at most {MAX_NOTE_CHARS}")
    try:
        note.encode("utf-8")
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ReportError("the key and --note must be valid text (UTF-8)") from None
    return key, note


def current_user() -> str:
    if os.name == "posix":
        import pwd

        if os.geteuid() == 0 and os.environ.get("SUDO_USER"):
            return os.environ["SUDO_USER"]
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return str(os.geteuid())
    import getpass  # pragma: no cover - Windows

    return getpass.getuser()  # pragma: no cover


def write_report(state_dir: str, key: str, note: str, reported_by: str | None = None) -> str:
    """Queue a report for the agent; returns the file's path. Raises ReportError or OSError."""
    key, note = check(key, note)
    directory = ensure_dir(state_dir)
    name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
    body = {"key": key, "note": note, "reported_by": reported_by or current_user(), "reported_at": now_ts()}
    path = os.path.join(directory, name)
    write_atomic(path, json.dumps(body, ensure_ascii=False).encode("utf-8"), mode=0o644)
    return path


def ensure_dir(state_dir: str) -> str:
    """``reports/``, owned like the state directory (root creating it must not lock the agent out)."""
    directory = reports_dir(state_dir)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.name == "posix" and os.geteuid() == 0:
            st = os.stat(state_dir)
            os.chown(directory, st.st_uid, st.st_gid)
    return directory


def _owner(path: str, claimed: str) -> str:
    if os.name != "posix":  # pragma: no cover - Windows has no file owner to trust
        return claimed
    import pwd

    uid = os.stat(path).st_uid
    if uid == 0 and claimed:
        return claimed
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _parse(path: str) -> Report:
    with open(path, "rb") as fh:
        raw = fh.read(64 * 1024)
    data: Any = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("key", "note")):
        raise ReportError("not a report object")
    key, note = check(data["key"], data["note"])
    claimed = str(data["reported_by"]) if isinstance(data.get("reported_by"), str) else ""
    at = str(data["reported_at"]) if isinstance(data.get("reported_at"), str) else ""
    name = os.path.basename(path)
    return Report(name[:-5], path, key, note, _owner(path, claimed), at)


def pending_reports(state_dir: str) -> list[Report]:
    """Queued reports, oldest first. A file that is not a report is moved to ``reports/bad/``."""
    directory = reports_dir(state_dir)
    try:
        names = sorted(n for n in os.listdir(directory) if _NAME.fullmatch(n))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list handling reports in %s: %s", directory, exc)
        return []
    out = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            out.append(_parse(path))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:  # JSON, UTF-8 and ReportError are ValueErrors
            _set_aside(path, exc)
    return out


def _set_aside(path: str, why: Exception) -> None:
    bad = os.path.join(os.path.dirname(path), "bad")
    log.warning("handling report %s is unreadable (%s); moved to %s", path, str(why)[:200], bad)
    try:
        os.makedirs(bad, exist_ok=True)
        os.replace(path, os.path.join(bad, os.path.basename(path)))
    except OSError as exc:
        log.warning("cannot move %s aside: %s", path, exc)


def remove(report: Report) -> None:
    try:
        os.unlink(report.path)
    except FileNotFoundError:
        pass
