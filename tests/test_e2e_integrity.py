"""The running collector (``pantau-collector serve``, real Mosquitto) under hostile input and a full disk."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

from tests.builder import poison_messages, usage_event
from tests.conftest import Mosquitto
from tests.fullfs import fill, small_fs
from tests.procs import publisher, start_collector, wait_until


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return -1


def healthz(http: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(http + "/healthz", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_poison_between_honest_events_costs_nothing_and_the_restart_is_clean(tmp_path: Path,
                                                                             mosquitto: Mosquitto) -> None:
    db = tmp_path / "collector.sqlite"
    collector, http = start_collector(tmp_path, mosquitto.url)
    pub = publisher(mosquitto.port)
    try:
        wait_until(lambda: "subscribed" in collector.log(), 20, what="the collector to subscribe")
        poison = poison_messages()
        for n in range(1, 21):
            pub.publish("pantau/v1/agents/load-1/events", usage_event(n), qos=1).wait_for_publish(10)
            if n <= len(poison):
                topic, raw = poison[n - 1]
                pub.publish(topic, raw, qos=1).wait_for_publish(10)
        wait_until(lambda: _count(db, "SELECT count(*) FROM evidence WHERE agent = 'load-1'") == 20, 30,
                   what="20 honest events")
        wait_until(lambda: _count(db, "SELECT count(*) FROM dead_letter") == len(poison), 10,
                   what="every poison message dead-lettered")
        with sqlite3.connect(db) as conn:
            reasons = [r[0] for r in conn.execute("SELECT reason FROM dead_letter ORDER BY id")]
            agents = conn.execute("SELECT * FROM agents").fetchall()
        assert all(reasons) and "ingest_failed" not in reasons
        json.dumps(agents, allow_nan=False)
        assert healthz(http)[0] == 200
        assert collector.term() == 0
        collector, http = start_collector(tmp_path, mosquitto.url)
        wait_until(lambda: "subscribed" in collector.log(), 20, what="the restarted collector")
        pub.publish("pantau/v1/agents/load-1/events", usage_event(21), qos=1).wait_for_publish(10)
        wait_until(lambda: _count(db, "SELECT count(*) FROM evidence WHERE agent = 'load-1'") == 21, 20,
                   what="ingest after the restart")
        assert "Traceback" not in collector.log()
    finally:
        pub.loop_stop()
        pub.disconnect()
        collector.term()


def test_a_full_disk_stops_acknowledging_and_healthz_says_why(tmp_path: Path, mosquitto: Mosquitto) -> None:
    with small_fs("4m") as mnt:
        db = mnt / "collector.sqlite"
        collector, http = start_collector(tmp_path, mosquitto.url, PANTAU_DB=str(db))
        pub = publisher(mosquitto.port)
        filler = None
        try:
            wait_until(lambda: "subscribed" in collector.log(), 20, what="the collector to subscribe")
            for n in range(1, 11):
                pub.publish("pantau/v1/agents/load-1/events", usage_event(n), qos=1).wait_for_publish(10)
            wait_until(lambda: _count(db, "SELECT count(*) FROM evidence") == 10, 20, what="the first events")
            filler = fill(mnt)
            for n in range(11, 61):
                pub.publish("pantau/v1/agents/load-1/events", usage_event(n), qos=1).wait_for_publish(10)
            _, body = wait_until(lambda: (h := healthz(http))[0] == 503 and h, 60, what="/healthz to say 503")
            assert any("full" in r for r in body["reasons"]), body
            filler.unlink()
            filler = None
            wait_until(lambda: _count(db, "SELECT count(*) FROM evidence") == 60, 90, what="all 60 events stored")
            wait_until(lambda: healthz(http)[0] == 200, 30, what="/healthz to recover")
            assert _count(db, "SELECT count(DISTINCT seq) FROM evidence") == 60
        finally:
            if filler is not None:
                filler.unlink()
            pub.loop_stop()
            pub.disconnect()
            collector.term()
