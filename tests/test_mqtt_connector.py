"""common.mqtt.Connector and collector.subscriber.Subscriber against a fake paho client.

The fall-back to 3.1.1 happens on the first attempts only; acknowledgements go to the live client
of the connection that delivered the message; the subscriber's health() names what is wrong.
The store is a real SQLite file; "disk full" is SQLite's own error from a capped page count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from collector.ingest import Collector
from collector.store.sqlite import SqliteStore
from collector.subscriber import Subscriber
from common.config import parse_broker
from common.mqtt import Connector, Handlers, MqttOptions, Will
from tests.fakepaho import FakeBroker
from tests.procs import wait_until

BROKER = parse_broker("mqtt://127.0.0.1:1883")


def event(seq: int, agent: str = "room-1") -> bytes:
    return (f'{{"v": 1, "agent": "{agent}", "boot": "bootbootboot", "seq": {seq}, "kind": "event", '
            f'"ts": "2026-11-30T03:00:{seq % 60:02d}.000Z", "type": "agent.started", "context": {{}}}}').encode()


def connector(fb: FakeBroker, version: str = "auto", handlers: Handlers | None = None, **kw: Any) -> Connector:
    opts = MqttOptions(broker=BROKER, client_id="c1", version=version, connack_timeout_s=0.3,
                       reconnect_base_s=0.05, reconnect_max_s=0.1, **kw)
    return Connector(opts, handlers, fb.factory)


@pytest.fixture
def running() -> Iterator[list[Connector]]:
    started: list[Connector] = []
    yield started
    for c in started:
        c.stop()


def go(c: Connector, running: list[Connector]) -> Connector:
    running.append(c)
    c.start()
    return c


@pytest.mark.parametrize("v5", ["refuse132", "refuse1", "silent"])
def test_falls_back_to_311_on_the_first_attempts(v5: str, running: list[Connector]) -> None:
    fb = FakeBroker(v5=v5)
    will = Will("pantau/v1/agents/a/state", b"{}")
    c = go(connector(fb, persistent=True, will=will), running)
    wait_until(c.connected.is_set, 5, what="a connection")
    assert c.protocol_name == "3.1.1"
    assert [x["protocol"] for x in fb.connects] == [mqtt.MQTTv5, mqtt.MQTTv311]
    assert fb.clients[-1].clean_session is False  # a persistent session on 3.1.1 too
    assert fb.clients[-1].will == (will.topic, will.payload, 1, True)
    assert c.clients_made == 2


def test_mqtt5_session_expiry_and_clean_start(running: list[Connector]) -> None:
    fb = FakeBroker()
    c = go(connector(fb, persistent=True), running)
    wait_until(c.connected.is_set, 5)
    assert (c.protocol_name, fb.connects[0]["clean"], fb.connects[0]["expiry"]) == ("5", False, 7 * 24 * 3600)
    fb2 = FakeBroker()
    c2 = go(connector(fb2, persistent=False), running)
    wait_until(c2.connected.is_set, 5)
    assert (fb2.connects[0]["clean"], fb2.connects[0]["expiry"]) == (True, None)


def test_never_falls_back_once_mqtt5_has_connected(running: list[Connector]) -> None:
    fb = FakeBroker()
    c = go(connector(fb), running)
    wait_until(c.connected.is_set, 5)
    # the broker goes away; when it answers again it is silent to MQTT 5 for a while, then refuses it
    fb.reachable = False
    fb.drop()
    wait_until(lambda: not c.connected.is_set(), 5)
    time.sleep(0.5)  # longer than the CONNACK timeout
    fb.v5, fb.reachable = "silent", True
    wait_until(lambda: len(fb.connects) >= 3, 5, what="attempts at the silent broker")
    fb.v5 = "refuse132"
    n = len(fb.connects)
    wait_until(lambda: len(fb.connects) >= n + 2, 5, what="attempts at the refusing broker")
    assert not c.connected.is_set()
    fb.v5 = "yes"
    wait_until(c.connected.is_set, 5)
    assert {x["protocol"] for x in fb.connects} == {mqtt.MQTTv5}
    assert c.clients_made == 1 and c.protocol_name == "5" and c.generation == 2


def test_unreachable_at_first_is_not_a_reason_to_fall_back(running: list[Connector]) -> None:
    fb = FakeBroker()
    fb.reachable = False
    c = go(connector(fb), running)
    time.sleep(0.8)
    assert "cannot reach broker" in (c.last_error or "")
    fb.reachable = True
    wait_until(c.connected.is_set, 5)
    assert c.protocol_name == "5" and c.clients_made == 1


def test_a_forced_version_never_falls_back(running: list[Connector]) -> None:
    fb = FakeBroker(v5="refuse132")
    c = go(connector(fb, version="5"), running)
    wait_until(lambda: len(fb.connects) >= 3, 5)
    assert not c.connected.is_set() and c.clients_made == 1
    assert "refused" in (c.last_error or "")


def test_other_refusals_do_not_fall_back(running: list[Connector]) -> None:
    fb = FakeBroker()
    fb.refuse_all = 135  # not authorised
    c = go(connector(fb), running)
    wait_until(lambda: len(fb.connects) >= 3, 5)
    assert {x["protocol"] for x in fb.connects} == {mqtt.MQTTv5}
    assert "Not authorized" in (c.last_error or "")


def test_handlers_run_and_a_failing_handler_does_not_kill_the_thread(running: list[Connector]) -> None:
    fb = FakeBroker()
    seen: list[Any] = []

    def on_message(msg: mqtt.MQTTMessage, gen: int) -> None:
        seen.append((msg.topic, gen))
        raise RuntimeError("handler bug")

    c = go(connector(fb, handlers=Handlers(on_message=on_message, on_connect=lambda p: seen.append(("connect", p)))),
           running)
    wait_until(c.connected.is_set, 5)
    fb.deliver("t/1", b"a")
    fb.deliver("t/2", b"b")
    wait_until(lambda: len(seen) == 3, 5)
    assert seen == [("connect", False), ("t/1", 1), ("t/2", 1)]
    assert c._thread is not None and c._thread.is_alive()


# ---------------------------------------------------------------- the subscriber


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "c.sqlite"))
    yield s
    s.close()


def subscriber(fb: FakeBroker, store: SqliteStore, **kw: Any) -> Subscriber:
    sub = Subscriber(Collector(store), BROKER, "pantau-collector", client_factory=fb.factory,
                     connack_timeout_s=0.3, **kw)
    sub.mqtt.opts = MqttOptions(**{**sub.mqtt.opts.__dict__, "reconnect_base_s": 0.05, "reconnect_max_s": 0.1})
    return sub


def stored(store: SqliteStore) -> int:
    return int(store.query("SELECT count(*) AS n FROM evidence")[0]["n"])


def test_acks_go_to_the_live_client_of_the_delivering_connection(store: SqliteStore) -> None:
    fb = FakeBroker(v5="refuse132")  # the subscriber's client is swapped once, before anything connected
    sub = subscriber(fb, store)
    sub.start()
    try:
        wait_until(sub.connected.is_set, 5)
        for seq in range(1, 51):
            fb.deliver("pantau/v1/agents/room-1/events", event(seq))
        wait_until(lambda: stored(store) == 50 and not fb.session, 10, what="50 stored and acknowledged")
        fb.drop()  # messages stored after this are acknowledged on the new connection only
        wait_until(lambda: sub.connected.is_set() and sub.mqtt.generation == 2, 5)
        for seq in range(51, 101):
            fb.deliver("pantau/v1/agents/room-1/events", event(seq))
        wait_until(lambda: stored(store) == 100 and not fb.session, 10)
        assert len(fb.acks) == 100 and all(live for _, _, live in fb.acks), "an ack went to a dead connection"
        assert len(fb.clients) == 2 and sub.stats()["protocol"] == "3.1.1"
        assert sub.health() == []
    finally:
        sub.stop()


def test_an_ack_for_a_dead_connection_is_not_sent_and_the_resent_copy_is_acknowledged(store: SqliteStore) -> None:
    fb = FakeBroker()
    sub = subscriber(fb, store)
    sub.start()
    try:
        wait_until(sub.connected.is_set, 5)
        with store.lock:
            fb.deliver("pantau/v1/agents/room-1/events", event(1))
            wait_until(lambda: sub.queue_depth == 1 and sub.q.empty(), 5, what="the batch in hand")
            fb.drop()
            wait_until(lambda: sub.mqtt.generation == 2, 5, what="the new connection")
        wait_until(lambda: not fb.session, 10, what="the re-sent copy acknowledged")
        assert stored(store) == 1  # the copy is a duplicate of what was stored
        assert sub.ack_skipped == 1 and [(c, live) for c, _, live in fb.acks] == [(fb.live, True)]
    finally:
        sub.stop()


def test_health_names_an_unreachable_broker(store: SqliteStore) -> None:
    fb = FakeBroker()
    fb.reachable = False
    sub = subscriber(fb, store, unreachable_s=0.3)
    sub.start()
    try:
        reasons = wait_until(sub.health, 5, what="a reason")
        assert len(reasons) == 1 and "not connected to the MQTT broker 127.0.0.1:1883" in reasons[0]
        assert "cannot reach broker" in reasons[0]
        fb.reachable = True
        wait_until(lambda: sub.health() == [], 5, what="healthy again")
    finally:
        sub.stop()


def test_health_names_a_full_disk_and_the_stalled_backlog_then_recovers(store: SqliteStore) -> None:
    fb = FakeBroker()
    sub = subscriber(fb, store, stalled_s=0.5)
    sub.start()
    try:
        wait_until(sub.connected.is_set, 5)
        fb.deliver("pantau/v1/agents/room-1/events", event(1))
        wait_until(lambda: stored(store) == 1, 5)
        with store.lock:  # the store's connection is shared: only under its lock
            pages = store.db.execute("PRAGMA page_count").fetchone()[0]
            store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite: database or disk is full
        for seq in range(2, 400):
            fb.deliver("pantau/v1/agents/room-1/events", event(seq) + b" " * 2000)
        reasons = wait_until(lambda: len(sub.health()) == 2 and sub.health(), 10, what="two reasons")
        assert any(r.startswith("storing the last batch failed: OperationalError:") and
                   "database or disk is full" in r for r in reasons), reasons
        assert any("messages waiting, no batch committed for" in r for r in reasons), reasons
        # every delivered message has reached the subscriber (the fake broker's socket may still hold a few)
        wait_until(lambda: stored(store) - 1 + sub.stats()["queue_depth"] == 398, 10, what="all 398 received")
        st = sub.stats()
        assert st["batch_failures"] >= 1 and st["seconds_since_commit"] >= 0.5
        # (the last page may still take a message or two before the cap bites)
        assert st["queue_depth"] >= 390 and stored(store) - 1 + st["queue_depth"] == 398
        assert len(fb.session) == st["queue_depth"]  # nothing unstored is acknowledged: the broker keeps it
        with store.lock:
            store.db.execute("PRAGMA max_page_count = 1073741823")
        wait_until(lambda: stored(store) == 399 and not fb.session, 40, what="the backlog stored")
        assert sub.health() == [] and sub.stats()["queue_depth"] == 0
    finally:
        sub.stop()


def test_backpressure_stops_reading_instead_of_growing_without_bound(store: SqliteStore) -> None:
    fb = FakeBroker()
    sub = subscriber(fb, store, max_queue=10)
    sub.start()
    try:
        wait_until(sub.connected.is_set, 5)
        with store.lock:  # the store is busy: the worker holds a batch it cannot write
            for seq in range(1, 31):
                fb.deliver("pantau/v1/agents/room-1/events", event(seq))
            wait_until(lambda: sub.queue_depth >= 10, 5)
            time.sleep(0.3)
            depth = sub.queue_depth
            for seq in range(31, 61):
                fb.deliver("pantau/v1/agents/room-1/events", event(seq))
            time.sleep(0.5)
            assert sub.queue_depth == depth <= 30  # the rest stays with the broker (here: in the socket)
        wait_until(lambda: stored(store) == 60 and not fb.session, 20)
    finally:
        sub.stop()


def test_health_names_a_session_taken_over(store: SqliteStore) -> None:
    fb = FakeBroker()
    sub = subscriber(fb, store)
    sub.start()
    try:
        wait_until(sub.connected.is_set, 5)
        fb.take_over()
        reasons = wait_until(sub.health, 5)
        assert "handed client id 'pantau-collector' to another connection" in reasons[0]
        wait_until(sub.connected.is_set, 5)
    finally:
        sub.stop()


def test_a_shared_subscription_on_a_311_broker_is_reported_not_silent(store: SqliteStore) -> None:
    fb = FakeBroker(v5="refuse132")
    sub = Subscriber(Collector(store), BROKER, "w0", share_group="pantau-ingest", client_factory=fb.factory)
    sub.start()
    try:
        reasons = wait_until(sub.health, 10, what="a reason")
        assert "needs MQTT 5" in reasons[0] and fb.subscriptions == []
    finally:
        sub.stop()


def test_a_listener_that_closes_before_answering_is_named(running: list[Connector]) -> None:
    """A plain mqtt:// URL pointed at a TLS-only listener: the broker drops the connection unanswered. That
    went on for ever without a word; now last_error (and the log) says what it likely is."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def drop_all() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.recv(64)  # the CONNECT arrives; a TLS listener finds no handshake in it and closes
            conn.close()

    t = threading.Thread(target=drop_all, daemon=True)
    t.start()
    try:
        c = go(Connector(MqttOptions(broker=parse_broker(f"mqtt://127.0.0.1:{port}"), client_id="c1",
                                     version="3.1.1", reconnect_base_s=0.05, reconnect_max_s=0.2)), running)
        wait_until(lambda: "closed the connection before answering" in (c.last_error or ""), 10,
                   what="the refusal named")
        assert "TLS listener" in (c.last_error or "")
    finally:
        stop.set()
        t.join(5)
        srv.close()


@pytest.mark.broker
def test_two_clients_with_one_id_are_named_and_back_off(mosquitto: Any, running: list[Connector],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Two agents with one agent_id took each other's connection about every second for ever, each logging
    only "disconnected" (Mosquitto 2.0 gives 3.1.1 clients no reason). Now each says what is likely going on,
    and its back-off keeps growing instead of starting afresh after every short connection."""
    opts = MqttOptions(broker=parse_broker(mosquitto.url), client_id="pantau-agent-twin", version="3.1.1",
                       reconnect_base_s=0.05, reconnect_max_s=2.0)
    caplog.set_level(logging.WARNING, logger="common.mqtt")
    a, b = go(Connector(opts), running), go(Connector(opts), running)
    wait_until(lambda: max(a.short_lived, b.short_lived) >= 3, 30, what="three short connections in a row")
    wait_until(lambda: "another client using client id 'pantau-agent-twin'" in caplog.text, 5, what="the warning")
    drops = a.disconnects + b.disconnects
    time.sleep(4)
    # backing off towards reconnect_max_s (2 s): a few take-overs in 4 s, not one every 50 ms (~80 without it)
    assert a.disconnects + b.disconnects - drops <= 10
