"""The shared MQTT connector against real brokers: Mosquitto (MQTT 5) and the embedded amqtt (3.1.1 only,
silent to an MQTT 5 CONNECT that carries a will)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from collector.ingest import Collector
from collector.store.sqlite import SqliteStore
from collector.subscriber import Subscriber
from common.config import parse_broker
from tests.builder import usage_event
from tests.conftest import Mosquitto, free_port
from tests.procs import publisher, wait_until

pytestmark = pytest.mark.broker
TOPIC = "pantau/v1/agents/load-1/events"


def stored(store: SqliteStore) -> int:
    return int(store.query("SELECT count(*) AS n FROM evidence")[0]["n"])


def publish(port: int, seqs: range, client_id: str) -> None:
    pub = publisher(port, client_id)
    try:
        for seq in seqs:
            pub.publish(TOPIC, usage_event(seq), qos=1).wait_for_publish(10)
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_collector_stays_on_mqtt5_after_a_late_broker_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    sub = Subscriber(Collector(store), parse_broker(mosquitto.url), "late-restart")
    sub.start()
    try:
        wait_until(sub.connected.is_set, 10)
        publish(mosquitto.port, range(1, 51), "pub-1")
        wait_until(lambda: stored(store) == 50, 20)
        time.sleep(max(0.0, 6.0 - (time.monotonic() - sub.started_at)))  # past the 5 s CONNACK timeout
        mosquitto.stop()
        time.sleep(7.0)  # an outage longer than the CONNACK timeout
        mosquitto.start()
        wait_until(sub.connected.is_set, 40, what="the reconnect")
        publish(mosquitto.port, range(51, 101), "pub-2")
        wait_until(lambda: stored(store) == 100, 30, what="ingestion after the restart")
        assert sub.mqtt.protocol_name == "5" and sub.mqtt.clients_made == 1
        assert sub.mqtt.generation >= 2 and sub.health() == []
        log = (mosquitto.dir / "mosquitto.log").read_text()
        protocols = re.findall(r"as late-restart \((p\d)", log)
        assert len(protocols) >= 2 and set(protocols) == {"p5"}, protocols
    finally:
        sub.stop()
        store.close()


def test_agent_and_collector_fall_back_to_311_against_amqtt(tmp_path: Path) -> None:
    from agent.config import load
    from agent.runner import Agent
    from collector.broker import EmbeddedBroker

    port = free_port()
    broker = EmbeddedBroker(port)
    broker.start()
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    (tmp_path / "bus.json").write_text('{"devices": []}')
    sub = Subscriber(Collector(store), parse_broker(f"mqtt://127.0.0.1:{port}"), "amqtt-collector")
    agent = Agent(load(env={}, agent_id="room-1", broker=f"mqtt://127.0.0.1:{port}", usb_backend="simulated",
                       simulated_bus=str(tmp_path / "bus.json"), state_dir=str(tmp_path / "state")))
    try:
        sub.start()
        wait_until(sub.connected.is_set, 20, what="the collector on 3.1.1")
        assert sub.mqtt.protocol_name == "3.1.1"
        agent.emit({"type": "agent.started", "context": {"host_boot": None, "version": "test"}})
        agent.session.start()
        wait_until(agent.session.connected.is_set, 20, what="the agent on 3.1.1")
        assert agent.session.protocol == "3.1.1" and agent.session.mqtt.clients_made == 2
        rows = wait_until(lambda: store.query("SELECT type FROM evidence WHERE agent = 'room-1'"), 20,
                          what="the agent's messages in the store")
        assert "agent.started" in {r["type"] for r in rows}
        wait_until(lambda: agent.outbox.empty, 10, what="the outbox drained")
    finally:
        agent.session.stop()
        sub.stop()
        store.close()
        broker.stop()
