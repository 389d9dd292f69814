"""A throw-away PostgreSQL server from the distribution's package, on a free loopback port in a temporary
folder: for the tests (``tests/conftest.py``) and the benchmarks (``bench/``). Imports nothing of pytest.

The server refuses to run as root: then it runs as user ``postgres`` (the package's), itself the child
process, so a signal to stop it reaches it. ``durable=False`` (the tests) turns fsync off."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


class PostgresServer:
    def __init__(self, durable: bool = False, db_prefix: str = "t") -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql; `make test` does)")
        bindir = found[-1].parent
        self.db_prefix = db_prefix
        self.dir = Path(tempfile.mkdtemp(prefix="pantau-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres", "postgres")
            as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        data = self.dir / "data"
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "pantau", "--auth=trust", "-E", "UTF8",
                        *([] if durable else ["--no-sync"])], check=True, capture_output=True, **as_user)
        settings = ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"]
        if not durable:
            settings += ["-c", "fsync=off"]
        self.log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                                      "-k", str(self.dir), *settings], stdout=self.log, stderr=self.log, **as_user)
        self._n = 0
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        end = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.Error:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"postgres did not start (log: {self.dir / 'postgres.log'})") from None
                time.sleep(0.1)

    def dsn(self, db: str) -> str:
        return f"postgresql://pantau@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database on this server: its connection string."""
        import psycopg

        self._n += 1
        name = f"{self.db_prefix}{self._n}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # fast shutdown: the sessions still open are ended
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
