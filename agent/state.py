"""Small files in the agent's state directory: the boot chain and the running agent's lock.

``boot``: the id of the boot that started last, written at every start (temporary file, fsync,
rename, fsync of the directory), so the next start can name it as ``context.prev_boot``.
``agent.lock``: held (``flock``) while an agent runs, so a second agent on the same state
directory refuses to start and ``report-handling`` can tell whether an agent will pick its report up.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import IO

log = logging.getLogger(__name__)
BOOT_FILE = "boot"
LOCK_FILE = "agent.lock"
_BOOT_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


class AlreadyRunning(RuntimeError):
    pass


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    if os.name != "posix":  # pragma: no cover - Windows cannot open a directory
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_prev_boot(state_dir: str) -> str | None:
    """The boot id recorded by the previous start; None on a first start or an unreadable file."""
    path = os.path.join(state_dir, BOOT_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(256).strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s (%s); this start names no previous boot", path, exc)
        return None
    if not _BOOT_ID.fullmatch(text):
        log.warning("%s does not hold a boot id; this start names no previous boot", path)
        return None
    return text


def record_boot(state_dir: str, boot: str) -> str | None:
    """Record ``boot`` as the latest start and return the one before it. A disk that refuses the
    write does not stop the agent: the next start then names no previous boot (and says why)."""
    prev = read_prev_boot(state_dir)
    try:
        write_atomic(os.path.join(state_dir, BOOT_FILE), (boot + "\n").encode())
    except OSError as exc:
        log.warning("cannot record boot %s in %s (%s); the next start will not name it", boot, state_dir, exc)
    return prev


class AgentLock:
    """An exclusive ``flock`` on ``agent.lock`` for as long as the agent runs."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LOCK_FILE)
        self._fh: IO[bytes] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "ab")  # noqa: SIM115 - held open while the agent runs
        try:
            os.chmod(self.path, 0o644)  # readable, so report-handling can test the lock
        except OSError:
            pass
        if os.name == "posix":
            import fcntl

            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise AlreadyRunning(f"another agent is running with state directory "
                                     f"{os.path.dirname(self.path)}") from None
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None


def agent_running(state_dir: str) -> bool | None:
    """True while an agent holds the lock, False if none does, None where it cannot be told."""
    if os.name != "posix":  # pragma: no cover - no flock on Windows
        return None
    import fcntl

    try:
        fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops a shared lock we got
    return False
