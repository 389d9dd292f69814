"""Shared helpers for the benchmarks: a throw-away Mosquitto and free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self) -> None:
        if shutil.which("mosquitto") is None:
            sys.exit("bench: mosquitto is needed (apt-get install mosquitto mosquitto-clients)")
        self.dir = Path(tempfile.mkdtemp(prefix="pantau-bench-mq-"))
        os.chmod(self.dir, 0o777)
        self.port = free_port()
        (self.dir / "m.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
            "max_inflight_messages 0\nlog_dest none\n")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.dir / "m.conf")])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

