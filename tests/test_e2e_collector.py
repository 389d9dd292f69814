"""The collector against a real Mosquitto: nothing lost on SIGKILL, recovery after a broker
restart, and hostile input counted and survived."""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.builder import usage_event
from tests.conftest import Mosquitto
from tests.procs import db_rows, publisher, start_collector, wait_until

pytestmark = pytest.mark.broker


def stored(db: Path, agent: str = "load-1") -> int:
    rows = db_rows(db, "SELECT count(*) FROM evidence WHERE agent=?", (agent,))
    return int(rows[0][0]) if rows else 0


def metrics(http: str) -> dict[str, float]:
    with urllib.request.urlopen(http + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    n = 3000
    db = tmp_path / "collector.sqlite"
    collector, _ = start_collector(tmp_path, mosquitto.url)
    wait_until(lambda: db.exists() and "subscribed" in collector.log(), 20, what="the collector to subscribe")
    pub = publisher(mosquitto.port)
    infos = []
    for seq in range(1, n + 1):
        infos.append(pub.publish("pantau/v1/agents/load-1/events", usage_event(seq), qos=1))
        if seq == n // 3:
            wait_until(lambda: stored(db) > 0, 20, what="the first stored events")
            collector.kill9()  # mid-stream
    for info in infos:
        info.wait_for_publish(30)
    pub.loop_stop()
    pub.disconnect()
    collector, _ = start_collector(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: stored(db) >= n, 90, what=f"{n} stored events")
        time.sleep(1.0)
        assert stored(db) == n
        assert db_rows(db, "SELECT count(DISTINCT seq) FROM evidence WHERE agent='load-1'")[0][0] == n
    finally:
        collector.term()


def test_ingestion_resumes_after_a_broker_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "collector.sqlite"
    collector, http = start_collector(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: "subscribed" in collector.log(), 20)
        pub = publisher(mosquitto.port, "pub-1")
        for seq in range(1, 101):
            pub.publish("pantau/v1/agents/load-1/events", usage_event(seq), qos=1).wait_for_publish(10)
        wait_until(lambda: stored(db) == 100, 20)
        pub.loop_stop()
        pub.disconnect()
        mosquitto.stop()
        time.sleep(2)
        mosquitto.start()
        pub = publisher(mosquitto.port, "pub-2")
        for seq in range(101, 201):
            pub.publish("pantau/v1/agents/load-1/events", usage_event(seq), qos=1).wait_for_publish(10)
        wait_until(lambda: stored(db) == 200, 60, what="ingestion after the restart")
        pub.loop_stop()
        pub.disconnect()
        assert metrics(http)["pantau_messages_stored_total"] >= 100
    finally:
        collector.term()


def test_forged_oversized_malformed_and_duplicate_messages(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "collector.sqlite"
    collector, http = start_collector(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: "subscribed" in collector.log(), 20)
        pub = publisher(mosquitto.port)
        t = "pantau/v1/agents/load-1/events"
        good = usage_event(1)
        forged = json.loads(usage_event(2))
        forged["agent"] = "other-room"
        big = json.loads(usage_event(3))
        big["context"]["pad"] = "x" * 70_000
        for topic, payload in [
            (t, good), (t, good),                                    # duplicate
            (t, json.dumps(forged).encode()),                        # forgery
            (t, json.dumps(big).encode()),                           # oversized
            (t, b"\x00\xffnot json"),                                # malformed
            (t, b'{"v": 1}'),                                        # missing members
            ("pantau/v1/agents/BAD ID/events", good),                # bad topic
            ("pantau/v1/agents/load-1/telemetry", good),             # kind does not match topic
            (t, usage_event(4)),                                     # still alive afterwards
        ]:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_until(lambda: stored(db) == 2, 20, what="the two valid events")
        m = wait_until(lambda: (mm := metrics(http)) and mm["pantau_messages_received_total"] >= 9 and mm, 10)
        assert m["pantau_messages_duplicate_total"] == 1
        assert m['pantau_messages_rejected_total{reason="agent_mismatch"}'] == 1
        assert m['pantau_messages_rejected_total{reason="too_large"}'] == 1
        assert m['pantau_messages_rejected_total{reason="bad_json"}'] == 1
        assert m['pantau_messages_rejected_total{reason="missing_member"}'] == 1
        assert m['pantau_messages_rejected_total{reason="bad_topic"}'] == 1
        assert m['pantau_messages_rejected_total{reason="kind_mismatch"}'] == 1
        assert m["pantau_messages_stored_total"] == 2
        with sqlite3.connect(db) as conn:
            dead = [r[0] for r in conn.execute("SELECT reason FROM dead_letter")]
        assert sorted(dead) == sorted(
            ["agent_mismatch", "too_large", "bad_json", "missing_member", "bad_topic", "kind_mismatch"])
        assert collector.p.poll() is None
        pub.loop_stop()
        pub.disconnect()
    finally:
        collector.term()


def telemetry(seq: int, agent: str) -> bytes:
    body = json.loads(usage_event(seq, agent=agent))
    body.pop("type"), body.pop("device"), body.pop("context")
    body.update(kind="telemetry", host={"cpu_pct": 3.5}, devices=[{"key": "046d:0843:A1", "present": True}])
    return json.dumps(body).encode()


def test_receiver_processes_share_the_stream_and_a_killed_one_loses_nothing(tmp_path: Path,
                                                                             mosquitto: Mosquitto) -> None:
    """The default: two receiver processes feeding one writer. Telemetry is split between them, evidence
    channels go to receiver 0; one killed -9 mid-stream is started again and every message is stored once."""
    import psutil

    db = tmp_path / "collector.sqlite"
    collector, http = start_collector(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: "subscribed" in collector.log() and "joined" in collector.log(), 30,
                   what="two receivers subscribed")
        log = collector.log()
        assert "receiver0" in log and "receiver1" in log
        assert "$share/pantau-ingest/pantau/v1/agents/+/telemetry" in log
        pub = publisher(mosquitto.port)
        infos = []
        for seq in range(1, 101):
            for a in range(10):
                if seq <= 50:
                    infos.append(pub.publish(f"pantau/v1/agents/load-{a}/events",
                                             usage_event(seq, agent=f"load-{a}"), qos=1))
                else:
                    infos.append(pub.publish(f"pantau/v1/agents/load-{a}/telemetry",
                                             telemetry(seq, f"load-{a}"), qos=1))
            if seq == 60:
                pid = re.search(r"receiver 1 started \(pid (\d+)\)", collector.log())
                assert pid is not None
                psutil.Process(int(pid.group(1))).kill()  # a receiver, mid-stream
        err = json.loads(usage_event(101, agent="load-0"))
        err.update(type="device.error", error={"code": "video.stream_error", "source": "kernel", "errno": -71,
                                               "problem_code": None, "message": "x", "count": 1})
        infos.append(pub.publish("pantau/v1/agents/load-0/events", json.dumps(err).encode(), qos=1))
        for info in infos:
            info.wait_for_publish(20)
        wait_until(lambda: "starting it again" in collector.log(), 20, what="the killed receiver restarted")
        wait_until(lambda: db_rows(db, "SELECT count(*) FROM seen")[0][0] == 1001, 60, what="1001 messages")
        time.sleep(1.0)
        assert db_rows(db, "SELECT count(*) FROM seen")[0][0] == 1001
        assert db_rows(db, "SELECT count(*) FROM host_samples")[0][0] == 500  # each telemetry once
        assert db_rows(db, "SELECT count(*) FROM evidence WHERE kind = 'event'")[0][0] == 501
        inc = wait_until(lambda: db_rows(db, "SELECT agent, rule FROM incidents"), 20, what="the incident")
        assert inc == [("load-0", "D2")]
        assert metrics(http)["pantau_messages_stored_total"] == 1001
        pub.loop_stop()
        pub.disconnect()
    finally:
        collector.term()


def test_a_batch_that_cannot_be_stored_is_retried_not_dropped(tmp_path: Path, mosquitto: Mosquitto,
                                                              caplog: pytest.LogCaptureFixture) -> None:

    from agent.config import parse_broker
    from collector.ingest import Collector
    from collector.store.sqlite import SqliteStore
    from collector.subscriber import Subscriber

    db = tmp_path / "c.sqlite"
    collector = Collector(SqliteStore(str(db)))
    sub = Subscriber(collector, parse_broker(mosquitto.url), "retry-test")
    sub.start()
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        wait_until(sub.connected.is_set, 10)
        time.sleep(0.3)
        blocker.execute("BEGIN EXCLUSIVE")  # the store cannot write: longer than its 5 s busy timeout
        pub = publisher(mosquitto.port)
        for seq in range(1, 11):
            pub.publish("pantau/v1/agents/load-1/events", usage_event(seq), qos=0).wait_for_publish(5)
        wait_until(lambda: "retrying" in caplog.text, 20, what="a failed attempt")
        blocker.execute("ROLLBACK")
        wait_until(lambda: stored(db) == 10, 30, what="the retried batch")
        pub.loop_stop()
        pub.disconnect()
    finally:
        blocker.close()
        sub.stop()


def test_receivers_after_receiving_in_process_drain_and_end_that_session(tmp_path: Path,
                                                                          mosquitto: Mosquitto) -> None:
    """receivers 0 -> 2: the in-process subscriber's own session would go on queueing everything for nobody
    (up to the broker's cap). At start the collector empties it into the store and ends it."""
    db = tmp_path / "collector.sqlite"
    collector, _ = start_collector(tmp_path, mosquitto.url, PANTAU_RECEIVERS="0")
    wait_until(lambda: "subscribed" in collector.log(), 30, what="the in-process subscriber")
    collector.term()
    pub = publisher(mosquitto.port)
    for seq in range(1, 101):  # while no collector runs: queued in that session
        pub.publish("pantau/v1/agents/load-1/events", usage_event(seq), qos=1).wait_for_publish(10)
    collector, _ = start_collector(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: "draining the broker session of pantau-collector," in collector.log(), 30,
                   what="the in-process session drained")
        wait_until(lambda: db_rows(db, "SELECT count(*) FROM seen")[0][0] == 100, 30, what="what it held")
        time.sleep(2.0)  # the drain ends the session once it is empty
        # MQTT 5, clean start off, session expiry 0: it resumes a session if one is there and leaves none behind
        probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pantau-collector", protocol=mqtt.MQTTv5)
        present: list[bool] = []
        probe.on_connect = lambda c, u, flags, rc, p: present.append(bool(flags.session_present))
        probe.connect("127.0.0.1", mosquitto.port, clean_start=False)
        probe.loop_start()
        wait_until(lambda: bool(present), 10, what="the probe connected")
        probe.loop_stop()
        probe.disconnect()
        assert present == [False], "the in-process subscriber's session is still there"
    finally:
        pub.loop_stop()
        pub.disconnect()
        collector.term()


def test_fewer_receivers_than_before_drain_and_end_the_sessions_left(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Receivers 2 -> 1: the second receiver's session, still a member of the shared group, would keep taking
    half of the telemetry that nobody stores. At start the collector empties it into the store and ends it."""
    db = tmp_path / "collector.sqlite"
    collector, _ = start_collector(tmp_path, mosquitto.url)
    wait_until(lambda: "subscribed" in collector.log() and "joined" in collector.log(), 30, what="two receivers")
    collector.term()
    pub = publisher(mosquitto.port)
    for seq in range(1, 201):  # while no collector runs: queued in both receivers' sessions
        pub.publish("pantau/v1/agents/load-1/telemetry", telemetry(seq, "load-1"), qos=1).wait_for_publish(10)
    collector, _ = start_collector(tmp_path, mosquitto.url, PANTAU_RECEIVERS="1")
    try:
        wait_until(lambda: "draining the broker session of pantau-collector-r1" in collector.log(), 30,
                   what="the leftover session drained")
        wait_until(lambda: db_rows(db, "SELECT count(*) FROM host_samples")[0][0] == 200, 30,
                   what="what both sessions held")
        time.sleep(2.0)  # the drain ends the session once it is empty
        for seq in range(201, 401):
            pub.publish("pantau/v1/agents/load-1/telemetry", telemetry(seq, "load-1"), qos=1).wait_for_publish(10)
        wait_until(lambda: db_rows(db, "SELECT count(*) FROM host_samples")[0][0] == 400, 30,
                   what="every later message, none left to the ended session")
        assert db_rows(db, "SELECT count(*) FROM seen")[0][0] == 400
    finally:
        pub.loop_stop()
        pub.disconnect()
        collector.term()
