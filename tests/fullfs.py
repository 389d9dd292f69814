"""A real filesystem that can be filled: a small tmpfs mounted for one test (needs root)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_fs(size: str = "1m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on a fresh directory; unmount and remove it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("filling a real filesystem needs root (mount -t tmpfs); run as root to test a full disk")
    mnt = Path(tempfile.mkdtemp(prefix="pantau-fullfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(mnt, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); a full disk needs it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write until the filesystem refuses (ENOSPC); returns the file to delete to free it."""
    path = directory / name
    chunk = b"\0" * 4096
    with open(path, "ab", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with open(path, "ab", buffering=0) as fh:  # the last partial block too
        for _ in range(4096):
            try:
                fh.write(b"\0")
            except OSError:
                break
    return path
