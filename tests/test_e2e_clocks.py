"""Per-agent clocks end to end: a real Mosquitto, ``pantau-collector serve`` and a real SQLite file.

One agent's wrong clock must change nothing for the others, and decisions must survive a
maintenance pass and a restart of the collector; settled incidents stay as they are.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

from collector.ingest import Collector, Inbound
from collector.store.sqlite import SqliteStore
from tests.builder import CAM, SPK, T0, Agent
from tests.conftest import Mosquitto
from tests.procs import publisher, start_collector, wait_until

DAY = 24 * 60.0


def _rows(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def _publish(pub, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
    for line in lines:
        rec = json.loads(line)
        pub.publish(rec["topic"], json.dumps(rec["payload"]), qos=1).wait_for_publish(10)


def test_a_wrong_clock_elsewhere_changes_no_decision_live(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "collector.sqlite"
    lines: list[str] = []
    r = Agent("room-r", "bootroomR001", lines, base=T0 + timedelta(days=5 * 365)).started()  # 2031
    r.telemetry(1, [])
    year1 = {"v": 1, "agent": "room-r", "boot": "bootroomR001", "seq": 99, "ts": "0001-01-01T00:00:00Z",
             "kind": "event", "type": "agent.stopping", "context": {}}
    lines.append(json.dumps({"topic": "pantau/v1/agents/room-r/events", "payload": year1}))
    a = Agent("room-a", "bootroomA001", lines).started()
    a.detach(30, CAM)
    a.attach(34, CAM)  # an idle camera put back after 4 minutes
    a.telemetry(45, [CAM["key"], SPK["key"]])
    c = Agent("room-c", "bootroomC001", lines).started()
    c.detach(30, CAM, in_use=True)  # pulled during a meeting
    c.attach(31, CAM)
    c.error(91, CAM, "video.stream_error")  # an hour later
    collector, _ = start_collector(tmp_path, mosquitto.url)
    pub = publisher(mosquitto.port)
    try:
        wait_until(lambda: "subscribed" in collector.log(), 20, what="the collector to subscribe")
        _publish(pub, lines)
        wait_until(lambda: _rows(db, "SELECT rule FROM incidents WHERE agent = 'room-c'"), 20, what="room-c's incident")
        [(iid, rule, cause, status)] = _rows(db, "SELECT id, rule, cause, status FROM incidents WHERE agent='room-c'")
        assert (rule, cause, status) == ("D1", "handling_damage", "open")
        assert _rows(db, "SELECT count(*) FROM dead_letter WHERE reason LIKE 'ts%' OR detail LIKE '%0001%'")[0][0] == 1

        def unchanged() -> None:
            assert _rows(db, "SELECT id, rule, cause, status FROM incidents WHERE agent = 'room-c'") == [
                (iid, "D1", "handling_damage", "open")]
            assert _rows(db, "SELECT count(*) FROM incidents WHERE agent = 'room-a'") == [(0,)]  # not even withdrawn
            assert _rows(db, "SELECT action FROM audit WHERE incident = ?".replace("?", f"'{iid}'")) == [("opened",)]

        unchanged()
        time.sleep(11)  # the service's maintenance pass (every 10 s): classification and pruning
        unchanged()
        assert collector.term() == 0
        collector, _ = start_collector(tmp_path, mosquitto.url)
        wait_until(lambda: collector.log().count("subscribed") >= 1, 20, what="the restarted collector")
        r.telemetry(2, [])
        _publish(pub, lines[-1:])
        time.sleep(11)
        unchanged()
        offsets = dict(_rows(db, "SELECT agent, clock_offset_s FROM agents"))
        assert offsets["room-r"] < -4 * 365 * 86400  # five years ahead: received long before its ts
        assert offsets["room-c"] > 0
    finally:
        pub.loop_stop()
        pub.disconnect()
        collector.term()


def _feed(c: Collector, lines: list[str]) -> None:
    for line in lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])


def test_an_incident_resolved_nine_days_ago_stays_after_housekeeping_and_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    a = Agent().started()
    a.detach(20, SPK, in_use=True)
    a.attach(21, SPK)
    a.error(30, SPK, "audio.stream_error")  # D1, relying on the detach while in use
    a.event("device.recovered", 40, SPK, error={"code": "audio.stream_error"})
    a.detach(50, CAM)
    a.attach(90, CAM)  # M2, resolved
    c = Collector(SqliteStore(str(db)))
    _feed(c, a.lines)
    c.tick()
    before = c.store.query("SELECT * FROM incidents ORDER BY id")
    assert sorted((r["rule"], r["status"]) for r in before) == [("D1", "resolved"), ("M2", "resolved")]
    n = len(a.lines)
    for day in range(1, 10):  # nine days of telemetry: the agent's clock moves on
        a.telemetry(day * DAY + 90, [CAM["key"], SPK["key"]])
        a.event("device.usage", day * DAY + 91, CAM, context={"in_use": False, "users": [], "meeting": False})
    _feed(c, a.lines[n:])
    c.tick()
    c.tick()  # housekeeping forgets the evidence these incidents read
    assert c.classifier is not None and all(e.kind == "inventory" for e in c.classifier.histories["room-1"].items
                                            if e.ts < T0.timestamp() + 91 * 60)  # the last inventory stays
    after = c.store.query("SELECT * FROM incidents ORDER BY id")
    assert after == before
    c.store.close()
    c2 = Collector(SqliteStore(str(db)))  # a restart: the same horizon, the same decisions
    c2.tick()
    assert c2.store.query("SELECT * FROM incidents ORDER BY id") == before
    assert [r["action"] for r in c2.store.query("SELECT action FROM audit ORDER BY id")].count("withdrawn") == 0
    c2.store.close()


# ---------------------------------------------------------------- pruning never changes a decision


def _live_ticking(lines: list[str], db: Path, restart_at: int | None = None) -> list[tuple]:
    """The live path with a maintenance pass after every message (the service runs one every 10 s), and
    optionally a restart of the collector on the same file."""
    c = Collector(SqliteStore(str(db)))
    for n, line in enumerate(lines):
        if n == restart_at:
            c.store.close()
            c = Collector(SqliteStore(str(db)))
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
        c.tick()
    c.tick()
    rows = c.store.query("SELECT id, kind, device, rule, opened_at, resolved_at FROM incidents "
                         "WHERE status != 'withdrawn' ORDER BY opened_at")
    actions = [r["action"] for r in c.store.query("SELECT action FROM audit ORDER BY id")]
    c.store.close()
    assert "withdrawn" not in actions
    return [tuple(r.values()) for r in rows]


def _replayed(lines: list[str]) -> list[tuple]:
    from tests.builder import replay

    return [(i["id"], i["kind"], i["device"], i["rule"], i["opened_at"], i["resolved_at"])
            for i in replay("\n".join(lines) + "\n")]


def test_a_reopened_incident_once_settled_leaves_no_second_incident_of_its_remains(tmp_path: Path) -> None:
    a = Agent()
    a.error(10, CAM, "video.stream_error")
    a.event("device.recovered", 15, CAM, error={"code": "video.stream_error"})
    a.error(3 * DAY, CAM, "video.stream_error")
    a.event("device.recovered", 3 * DAY + 10, CAM, error={"code": "video.stream_error"})
    a.telemetry(10 * DAY + 11, [CAM["key"]])
    expected = _replayed(a.lines)
    assert len(expected) == 1
    assert _live_ticking(a.lines, tmp_path / "a.sqlite") == expected


def test_an_absence_after_more_than_the_horizon_is_still_judged(tmp_path: Path) -> None:
    a = Agent(boot="bootlong0001").started()
    a.telemetry(9 * DAY, [CAM["key"], SPK["key"]])  # a room PC up for nine days
    b = a.restart("bootnext0001").started(at=9 * DAY + 3, devices=[SPK])
    b.telemetry(9 * DAY + 14, [SPK["key"]])
    expected = _replayed(a.lines)
    assert [(r[2], r[3]) for r in expected] == [(CAM["key"], "M2")]
    assert _live_ticking(a.lines, tmp_path / "a.sqlite") == expected


def test_a_window_carried_over_a_long_holiday_is_still_judged(tmp_path: Path) -> None:
    a = Agent(boot="boothol00001").started()
    a.detach(60, CAM, in_use=True)
    a.event("agent.stopping", 61)
    b = a.restart("bootback0001").started(at=9 * DAY, devices=[SPK])
    b.telemetry(9 * DAY + 11, [SPK["key"]])
    expected = _replayed(a.lines)
    assert [(r[2], r[3]) for r in expected] == [(CAM["key"], "M1")]
    assert _live_ticking(a.lines, tmp_path / "a.sqlite") == expected


def test_a_store_without_horizons_restarts_to_the_same_decisions(tmp_path: Path) -> None:
    from tests.builder import live

    a = Agent().started()
    a.detach(10, SPK)
    a.telemetry(21, [CAM["key"]])
    a.attach(30, SPK)
    a.detach(6 * DAY, SPK)
    a.attach(6 * DAY + 30, SPK)
    a.telemetry(8 * DAY + 120, [CAM["key"], SPK["key"]])
    text = "\n".join(a.lines) + "\n"
    expected = sorted(_replayed(a.lines))
    rows = live(text, tmp_path / "a.sqlite", tick=False, restart=True)
    assert sorted((r["id"], r["kind"], r["device"], r["rule"], r["opened_at"], r["resolved_at"]) for r in rows) == \
        expected
