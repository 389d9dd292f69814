"""The receivers-and-writer path (collector/receiver.py, collector/writer.py) against a real Mosquitto:
refusals keep their exact reasons, a dashboard report cannot come over MQTT, and health names a broker
that is away."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from collector.config import CollectorConfig
from collector.ingest import Collector
from collector.store.sqlite import SqliteStore
from collector.writer import Writer
from tests.builder import usage_event
from tests.conftest import Mosquitto, free_port
from tests.procs import publisher, wait_until

pytestmark = pytest.mark.broker


def test_refused_messages_keep_their_reasons_and_honest_ones_are_stored(tmp_path: Path,
                                                                       mosquitto: Mosquitto) -> None:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    w = Writer(Collector(store), CollectorConfig(broker=mosquitto.url, db=str(tmp_path / "c.sqlite")), 2)
    w.start()
    pub = publisher(mosquitto.port)
    try:
        wait_until(lambda: all(st.get("connected") for st, _ in w.status.values()) and len(w.status) == 2, 20,
                   what="both receivers connected")
        time.sleep(0.3)
        dash = json.loads(usage_event(1, agent="load-1"))
        dash.update(boot="dashboard-0123456789ab", type="handling.reported", seq=1,
                    context={"note": "x", "reported_by": "y", "via": "dashboard"})
        bad = [b"{not json", json.dumps({**json.loads(usage_event(2)), "v": 2}).encode(), json.dumps(dash).encode()]
        for payload in [usage_event(1), *bad, usage_event(3)]:
            pub.publish("pantau/v1/agents/load-1/events", payload, qos=1).wait_for_publish(10)
        wait_until(lambda: store.query("SELECT count(*) AS n FROM dead_letter")[0]["n"] == 3, 20,
                   what="three refusals")
        reasons = [r["reason"] for r in store.query("SELECT reason FROM dead_letter ORDER BY id")]
        assert reasons == ["bad_json", "bad_version", "bad_boot"]
        assert [r["seq"] for r in store.query("SELECT seq FROM evidence ORDER BY seq")] == [1, 3]
        assert w.health() == []
    finally:
        pub.loop_stop()
        pub.disconnect()
        w.stop()
        store.close()


def test_health_names_a_broker_the_receivers_cannot_reach(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    w = Writer(Collector(store), CollectorConfig(broker=f"mqtt://127.0.0.1:{free_port()}",
                                                 db=str(tmp_path / "c.sqlite")), 1)
    w.unreachable_s = 1.0
    w.start()
    try:
        reasons = wait_until(w.health, 20, what="a health reason")
        assert any("receiver 0 not connected to the MQTT broker 127.0.0.1:" in r for r in reasons), reasons
    finally:
        w.stop()
        store.close()


def test_receivers_end_with_their_collector_even_when_it_is_killed(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Left running after a kill -9, idle receivers took the restarted collector's client ids from it, again
    and again (the broker hands a client id to its newest connection)."""
    import os

    import psutil

    from tests.procs import start_collector

    proc, _ = start_collector(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: len(psutil.Process(proc.p.pid).children()) >= 2 and "receiver 1 started" in
                   (tmp_path / "collector.log").read_text(), 30, what="two receivers started")
        kids = [c.pid for c in psutil.Process(proc.p.pid).children() if "receiver" in " ".join(c.cmdline())
                or c.name().startswith("python")]
        assert kids
        proc.kill9()
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE for k in kids) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [k for k in kids if psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE]
        for k in alive:
            os.kill(k, 9)
        assert not alive, f"receivers {alive} outlived their collector"
    finally:
        proc.term()


def test_health_names_a_receiver_whose_client_id_another_process_keeps_taking(tmp_path: Path,
                                                                            mosquitto: Mosquitto) -> None:
    import httpx
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.procs import start_collector

    proc, url = start_collector(tmp_path, mosquitto.url)
    impostor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pantau-collector-r1", clean_session=True)
    try:
        wait_until(lambda: "receiver 1 started" in (tmp_path / "collector.log").read_text(), 30,
                   what="receivers started")
        wait_until(lambda: httpx.get(url + "/healthz", timeout=5).status_code == 200, 30, what="healthy")
        impostor.reconnect_delay_set(0.2, 0.5)
        impostor.connect("127.0.0.1", mosquitto.port)
        impostor.loop_start()  # both keep reconnecting: each connection takes the client id from the other
        wait_until(lambda: "is another process using client id pantau-collector-r1" in
                   httpx.get(url + "/healthz", timeout=5).text, 60, what="health naming the lost connections")
    finally:
        impostor.loop_stop()
        impostor.disconnect()
        proc.term()


@pytest.mark.parametrize("receivers", ["2", "0"])
def test_retained_garbage_is_dead_lettered_once_not_at_every_subscription(tmp_path: Path, mosquitto: Mosquitto,
                                                                          receivers: str) -> None:
    from tests.procs import db_rows, start_collector

    pub = publisher(mosquitto.port)
    pub.publish("pantau/v1/agents/ret-1/state", b"{not json", qos=1, retain=True).wait_for_publish(10)
    pub.publish("pantau/v1/agents/ret-1/inventory", b'{"v": 1}', qos=1, retain=True).wait_for_publish(10)
    db = tmp_path / "collector.sqlite"
    try:
        for start in range(3):  # each start subscribes afresh: the broker delivers its retained copies again
            proc, _ = start_collector(tmp_path, mosquitto.url, name=f"c{start}", PANTAU_RECEIVERS=receivers)
            try:
                need = 2 * (start + 1)
                wait_until(lambda need=need: (db_rows(db, "SELECT value FROM counters WHERE name = 'received'")
                                              or [(0,)])[0][0] >= need, 30, what="both retained copies")
            finally:
                proc.term()
        assert sorted(db_rows(db, "SELECT reason FROM dead_letter")) == [("bad_json",), ("missing_member",)]
        counts = dict(db_rows(db, "SELECT name, value FROM counters"))
        assert counts["received"] == 6 and counts["duplicates"] == 4, counts
        assert counts["rejected:bad_json"] == counts["rejected:missing_member"] == 1, counts
    finally:
        pub.loop_stop()
        pub.disconnect()
