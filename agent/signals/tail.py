"""Follow a kernel log: ``/dev/kmsg`` (records, non-blocking) or a plain file (appended lines)."""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)


class KernelLogTail:
    """Returns the lines written since the last ``read()``; starts at the current end."""

    def __init__(self, path: str, from_start: bool = False) -> None:
        self.path = path
        self.kmsg = os.path.realpath(path) == "/dev/kmsg"
        self._fd: int | None = None
        self._pos = 0
        self._buf = b""
        self._from_start = from_start
        self._open()

    def _open(self) -> None:
        try:
            if self.kmsg:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                if not self._from_start:
                    os.lseek(self._fd, 0, os.SEEK_END)
            else:
                self._pos = 0 if self._from_start else os.path.getsize(self.path)
        except OSError as exc:
            log.warning("cannot open kernel log %s: %s", self.path, exc.strerror)

    def read(self) -> list[str]:
        return self._read_kmsg() if self.kmsg else self._read_file()

    def _read_kmsg(self) -> list[str]:
        if self._fd is None:
            return []
        lines = []
        while True:
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten before we read them
                    continue
                break
            if not rec:
                break
            lines.append(rec.decode("utf-8", "replace").split("\n", 1)[0])
        return lines

    def _read_file(self) -> list[str]:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self._pos:  # truncated or rotated
            self._pos, self._buf = 0, b""
        if size == self._pos:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._pos)
            data = fh.read(size - self._pos)
        self._pos += len(data)
        data = self._buf + data
        *complete, self._buf = data.split(b"\n")
        return [c.decode("utf-8", "replace") for c in complete]
