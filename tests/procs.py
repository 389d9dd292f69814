"""Agents, collectors and MQTT recorders as real processes and clients, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ROOT, free_port


def wait_until(fn: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    running: ClassVar[list[Proc]] = []  # reaped after every test by conftest's autouse fixture

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, "-m", *args], env={**os.environ, **env}, cwd=ROOT,
                                  stdout=self._log, stderr=self._log)
        Proc.running.append(self)

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def term(self, timeout: float = 20) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()
        return int(self.p.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_agent(tmp: Path, broker_url: str, agent_id: str = "room-1", bus: Path | None = None,
                **env: str) -> Proc:
    bus = bus or tmp / "bus.json"
    base = {"PANTAU_BROKER": broker_url, "PANTAU_AGENT_ID": agent_id, "PANTAU_STATE_DIR": str(tmp / "state"),
            "PANTAU_POLL_S": "0.2", "PANTAU_TELEMETRY_S": "1", "PANTAU_RECONNECT_MAX_S": "2",
            "PANTAU_LABELS": "unit=setjen,room=r1"}
    return Proc(["agent.cli", "simulate", "--bus", str(bus)], {**base, **env}, tmp / f"agent-{agent_id}.log")


def start_collector(tmp: Path, broker_url: str, name: str = "collector", **env: str) -> tuple[Proc, str]:
    port = free_port()
    base = {"PANTAU_BROKER": broker_url, "PANTAU_DB": str(tmp / "collector.sqlite"),
            "PANTAU_HTTP": f"127.0.0.1:{port}"}
    p = Proc(["collector.cli", "serve"], {**base, **env}, tmp / f"{name}.log")
    return p, f"http://127.0.0.1:{port}"


def db_rows(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    con = sqlite3.connect(path, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


class Recorder:
    """A persistent-session QoS 1 subscriber that records what reaches the broker."""

    def __init__(self, port: int, topic: str = "pantau/v1/#", client_id: str = "test-recorder") -> None:
        self.msgs: list[tuple[str, dict[str, Any] | str, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.2, 1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c, u, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            body: dict[str, Any] | str = json.loads(msg.payload)
        except ValueError:
            body = msg.payload.decode(errors="replace")
        with self.lock:
            self.msgs.append((msg.topic, body, bool(msg.retain)))

    def of(self, channel: str) -> list[dict[str, Any]]:
        with self.lock:
            return [b for t, b, _ in self.msgs if t.endswith("/" + channel) and isinstance(b, dict)]

    def events(self, etype: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("events") if etype is None or e.get("type") == etype]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def retained(port: int, topic: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The retained message on ``topic`` right now."""
    got: list[dict[str, Any]] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
    c.on_message = lambda cl, u, m: got.append(json.loads(m.payload)) if m.retain else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        end = time.monotonic() + timeout
        while not got and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        c.loop_stop()
        c.disconnect()
    return got[-1] if got else None


def publisher(port: int, client_id: str = "test-pub") -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c
