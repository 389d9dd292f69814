"""Two collectors on one shared subscription, writing to one real PostgreSQL: one is killed -9 mid-stream.

Every message is stored exactly once, another collector takes over classification within seconds, and
the incidents are those a single collector decides on the same stream (``tests.builder.live``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.builder import CAM, SPK, Agent, device, live
from tests.conftest import Mosquitto
from tests.procs import Proc, publisher, start_collector, wait_until

pytestmark = pytest.mark.broker

FIELDS = ("id", "agent", "device", "kind", "rule", "cause", "responsible", "status", "opened_at", "resolved_at")


def fleet(rooms: int = 12, usage: int = 60) -> str:
    """A fleet's stream: in every room a start, plenty of usage and telemetry, and trouble of each kind."""
    lines: list[str] = []
    for r in range(rooms):
        a = Agent(f"room-{r:02d}", f"boot{r:04d}aaaa", lines)
        a.started(0, [CAM, SPK])
        for k in range(usage):
            a.event("device.usage", 1 + k * 0.5, CAM, context={"in_use": k % 2 == 0, "users": [], "meeting": False})
            if k % 5 == 0:
                a.telemetry(1 + k * 0.5, [CAM["key"], SPK["key"]])
        t = 40.0
        kind = r % 4
        if kind == 0:  # a device fault, recovered, and again
            a.error(t, CAM, "video.stream_error")
            a.event("device.recovered", t + 1, CAM, error={"code": "video.stream_error"})
            a.error(t + 5, SPK, "usb.over_current")
        elif kind == 1:  # handled, then failing: the unit's responsibility
            a.event("handling.reported", t, CAM, context={"note": "jatuh", "reported_by": "budi", "via": "agent"})
            a.error(t + 3, CAM, "video.stream_error")
        elif kind == 2:  # pulled while in use and gone
            a.detach(t, CAM, in_use=True)
            for k in range(30):
                a.telemetry(t + 1 + k, [SPK["key"]])
        else:  # a replug, then a new device
            a.detach(t, SPK)
            a.attach(t + 0.5, SPK)
            a.inventory(t + 1, [CAM, SPK, device("046d:0843:NEW1", port="2-3")])
        a.telemetry(t + 60, [CAM["key"]])
    return "\n".join(lines) + "\n"


def pg_rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(sql).fetchall()
    except psycopg.Error:
        return []


def test_two_collectors_one_killed_store_everything_once_and_decide_as_one(
        tmp_path: Path, mosquitto: Mosquitto, postgres: str) -> None:
    text = fleet()
    msgs = [json.loads(line) for line in text.splitlines()]
    expected = sorted(tuple(r[f] for f in FIELDS) for r in live(text, tmp_path / "single.sqlite"))
    assert len(expected) >= 9  # the stream decides something in most rooms

    env = {"PANTAU_DB": postgres, "PANTAU_AUDIT_KEY_FILE": str(tmp_path / "audit.key"),
           "PANTAU_SHARE_GROUP": "pantau"}

    def start(name: str) -> Proc:
        p, _ = start_collector(tmp_path, mosquitto.url, name, PANTAU_CLIENT_ID=f"pantau-{name}", **env)
        return p

    a = start("a")
    wait_until(lambda: "subscribed" in a.log(), 30, what="collector a to subscribe")
    assert "this collector classifies" in a.log()
    b = start("b")
    wait_until(lambda: "subscribed" in b.log(), 30, what="collector b to subscribe")
    assert "this collector classifies" not in b.log()

    pub = publisher(mosquitto.port)
    infos = []
    half = len(msgs) // 2
    for i, m in enumerate(msgs):
        infos.append(pub.publish(m["topic"], json.dumps(m["payload"]).encode(), qos=1))
        if i == half:
            wait_until(lambda: pg_rows(postgres, "SELECT count(*) FROM seen")[0][0] > 0, 20, what="stored rows")
            a.kill9()  # the classifying collector, mid-stream
            killed = time.monotonic()
    wait_until(lambda: "this collector classifies" in b.log(), 15, what="collector b to take over classifying")
    took_over = time.monotonic() - killed
    print(f"classification taken over {took_over:.1f} s after the kill")
    assert took_over < 10, f"classification taken over after {took_over:.1f} s"
    for info in infos:
        info.wait_for_publish(30)
    pub.loop_stop()
    pub.disconnect()
    a = start("a")  # as a supervisor restarts it: its session's queued share is delivered to it

    try:
        wait_until(lambda: pg_rows(postgres, "SELECT count(*) FROM seen")[0][0] >= len(msgs), 90,
                   what=f"{len(msgs)} messages stored")
        time.sleep(1.0)
        assert pg_rows(postgres, "SELECT count(*) FROM seen")[0][0] == len(msgs)
        assert pg_rows(postgres, "SELECT count(*) FROM evidence GROUP BY agent, boot, seq HAVING count(*) > 1") == []
        events = sum(1 for m in msgs if m["topic"].endswith(("/events", "/inventory")))
        assert pg_rows(postgres, "SELECT count(*) FROM evidence WHERE kind IN ('event', 'inventory')")[0][0] == events
        stored = f"SELECT {', '.join(FIELDS)} FROM incidents WHERE status != 'withdrawn'"
        wait_until(lambda: sorted(pg_rows(postgres, stored)) == expected, 30, what="the single collector's incidents")
        assert pg_rows(postgres, "SELECT count(*) FROM dead_letter")[0][0] == 0
    finally:
        for p in (a, b):
            p.term()
