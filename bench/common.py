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
from typing import Any

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


class Postgres:
    """A throw-away PostgreSQL server from the distribution's package, on a free loopback port (as user
    ``postgres`` when run as root). Durable settings (fsync on), as a real server."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            sys.exit("bench: PostgreSQL is needed (apt-get install postgresql)")
        bindir = found[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="pantau-bench-pg-"))
        self.port = free_port()
        # the server refuses to run as root: then it runs as user postgres (the package's), itself the child
        # process, so a signal to stop it reaches it
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres", "postgres")
            as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        data = self.dir / "data"
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "pantau", "--auth=trust", "-E",
                        "UTF8"], check=True, capture_output=True, **as_user)
        self.proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                                      "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_user)
        self.n = 0
        deadline = time.monotonic() + 30
        while True:
            if subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not start")
            time.sleep(0.2)

    def new_database(self) -> str:
        import psycopg

        self.n += 1
        with psycopg.connect(f"postgresql://pantau@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE bench{self.n}")
        return f"postgresql://pantau@127.0.0.1:{self.port}/bench{self.n}"

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
