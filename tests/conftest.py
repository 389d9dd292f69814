"""Shared fixtures: real servers on free 127.0.0.1 ports, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.pgserver import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "data" / "examples"  # copies of shared/examples (PROTOCOL.md's)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0, terminate: bool = True) -> None:
    """Ask a child to stop (SIGTERM), and kill it if it has not after ``timeout``."""
    if terminate and proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Mosquitto:
    """A real Mosquitto on a free loopback port; restartable, with persistence."""

    def __init__(self, extra: str = "", port: int | None = None) -> None:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not installed: run `make test`, which installs it")
        # Started as root, Mosquitto drops to user "mosquitto": its files must be reachable by it,
        # which pytest's 0700 temporary folders are not.
        self.dir = Path(tempfile.mkdtemp(prefix="pantau-mq-"))
        os.chmod(self.dir, 0o777)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n"
            f"persistence true\npersistence_location {self.dir}/\nmax_queued_messages 0\n"
            f"max_inflight_messages 0\n{extra}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    from tests.pgserver import PostgresServer

    try:
        pg = PostgresServer()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}: run `make test`, which installs it")
    yield pg
    pg.close()


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> str:
    """A fresh PostgreSQL database for one test: its connection string."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What ``db`` names for each store: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "c.sqlite")
    return str(request.getfixturevalue("postgres"))


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Agents and collectors a test started are gone when it ends, whatever happened."""
    yield
    from tests.procs import Proc

    for p in Proc.running:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait()
    Proc.running.clear()


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    m = Mosquitto().start()
    yield m
    m.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pantau-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=kw.pop("cwd", ROOT), **kw)


@pytest.fixture
def collector(tmp_path: Path, store_db: str) -> Iterator[Any]:
    """A live Collector with tests.builder's REGISTRY loaded, on each store: a real SQLite file and a real
    PostgreSQL database."""
    from collector import audit
    from collector.ingest import Collector
    from collector.registry import load_toml
    from collector.store import open_store
    from tests.builder import REGISTRY

    if store_db.startswith("postgresql://"):
        audit.configure(store_db, str(tmp_path / "audit.key"))
    store = open_store(store_db)
    reg = tmp_path / "registry.toml"
    reg.write_text(REGISTRY)
    load_toml(store, str(reg))
    yield Collector(store)
    store.close()


@pytest.fixture(scope="session")
def agent_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The agent's wheels, built as an operator does (``pantau-collector bundle``), once per run."""
    out = tmp_path_factory.mktemp("bundle")
    r = subprocess.run([sys.executable, "-m", "collector.cli", "bundle", "--out", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    names = (out / "index.txt").read_text().split()
    assert any(n.startswith("pantau-") for n in names) and any(n.startswith("pip-") for n in names)
    assert any(n.startswith("paho_mqtt-") for n in names) and any(n.startswith("psutil-") for n in names)
    return str(out)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never a browser download: /work/shared/notes/services.md)."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    from playwright.sync_api import sync_playwright

    from tests.web_helpers import CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def _site(tmp_path: Path, db: str | None) -> Iterator[Any]:
    from tests.web_helpers import Site

    s = Site(tmp_path, db)
    yield s
    s.web.stop()
    s.store.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Any]:
    """The dashboard on a free port with tests.web_helpers.Site's fleet and accounts (SQLite)."""
    yield from _site(tmp_path, None)


@pytest.fixture
def site_on_each_store(tmp_path: Path, store_db: str) -> Iterator[Any]:
    """``site`` on each store: a real SQLite file and a real PostgreSQL database."""
    yield from _site(tmp_path, store_db)


@pytest.fixture
def smtp() -> Iterator[tuple[list[Any], int]]:
    from aiosmtpd.controller import Controller

    mails: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            mails.append(envelope)
            return "250 OK"

    port = free_port()
    ctl = Controller(Handler(), hostname="127.0.0.1", port=port)
    ctl.start()
    yield mails, port
    ctl.stop()


@pytest.fixture
def hooks() -> Iterator[Any]:
    """Webhook receivers (tests.builder.Hooks), closed after the test."""
    from tests.builder import Hooks

    h = Hooks()
    yield h
    h.close()
