"""The shipped Mosquitto configuration (deploy/mosquitto/), run for real with its paths and ports
rewritten for the test: no account can take another's client id, and oversized packets are refused.

A hostile account (a room PC's credentials in the wrong hands) tries to connect as the collector and
as another agent, with clean sessions that would wipe theirs, while an honest agent reports and the
collector (Collector + SqliteStore + Subscriber) ingests.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.ingest import Collector
from collector.store.sqlite import SqliteStore
from collector.subscriber import Subscriber
from common.config import parse_broker
from tests.builder import broker_pki, usage_event
from tests.conftest import ROOT, Mosquitto, free_port
from tests.procs import wait_until

pytestmark = pytest.mark.broker
SHIPPED = ROOT / "deploy" / "mosquitto"
PASSWORDS = {"pantau-collector": "c-pw", "room-1": "r1-pw", "evil": "evil-pw"}


@dataclass
class Shipped:
    m: Mosquitto
    tls_port: int
    ca: str

    @property
    def port(self) -> int:
        return self.m.port


def shipped_config(m: Mosquitto, tls_port: int) -> str:
    """deploy/mosquitto/pantau.conf with only its paths and ports changed (each rewrite must apply once)."""
    text = (SHIPPED / "pantau.conf").read_text()
    d = m.dir
    for old, new in [("/etc/mosquitto/pantau.passwd", f"{d}/passwd"), ("/etc/mosquitto/pantau.acl", f"{d}/acl"),
                     ("/etc/mosquitto/certs/", f"{d}/pki/"),
                     ("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n"),
                     ("\nlistener 1883 127.0.0.1\n", f"\nlistener {m.port} 127.0.0.1\n")]:
        assert text.count(old) >= 1, f"the shipped config no longer has {old!r}"
        text = text.replace(old, new)
    return text + f"\npersistence_location {d}/\nlog_dest stderr\n"


@pytest.fixture
def shipped() -> Iterator[Shipped]:
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("openssl and mosquitto_passwd are needed: run `make test`")
    m = Mosquitto()
    broker_pki(m.dir / "pki")
    shutil.copy(SHIPPED / "acl", m.dir / "acl")
    for i, (user, pw) in enumerate(PASSWORDS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(m.dir / "passwd"), user, pw],
                       check=True)
    for f in ("acl", "passwd"):
        os.chmod(m.dir / f, 0o644)
    tls_port = free_port()
    m.conf.write_text(shipped_config(m, tls_port))
    m.start()
    yield Shipped(m, tls_port, str(m.dir / "pki" / "ca.crt"))
    m.close()


class Client:
    """A paho client that records its connects, disconnects and acknowledged publishes."""

    def __init__(self, b: Shipped, client_id: str, user: str, tls: bool = False, v5: bool = True,
                 clean: bool = True) -> None:
        kw: dict[str, Any] = {"client_id": client_id, "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311}
        if not v5:
            kw["clean_session"] = clean
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, **kw)
        self.c.username_pw_set(user, PASSWORDS[user])
        if tls:
            self.c.tls_set(ca_certs=b.ca, cert_reqs=ssl.CERT_REQUIRED)
        self.c.max_inflight_messages_set(1000)
        self.connected = threading.Event()
        self.connects = 0
        self.disconnects: list[str] = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        host, port = ("localhost", b.tls_port) if tls else ("127.0.0.1", b.port)
        if v5:
            self.c.connect(host, port, clean_start=clean)
        else:
            self.c.connect(host, port)

    def _on_disconnect(self, c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        self.disconnects.append(str(rc))
        self.connected.clear()

    def _on_connect(self, c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        if not rc.is_failure:
            self.connects += 1
            self.connected.set()

    def start(self) -> Client:
        self.c.loop_start()
        wait_until(self.connected.is_set, 10, what="a connection")
        return self

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def subscriber(b: Shipped, store: SqliteStore) -> Subscriber:
    return Subscriber(Collector(store), parse_broker(f"mqtt://127.0.0.1:{b.port}"), "pantau-collector",
                      username="pantau-collector", password=PASSWORDS["pantau-collector"])


def stored(store: SqliteStore, agent: str = "load-1") -> int:
    return int(store.query("SELECT count(*) AS n FROM evidence WHERE agent = ?", (agent,))[0]["n"])


def event(seq: int) -> bytes:
    return usage_event(seq, agent="room-1", boot="bootroom0001")


def hostile_once(b: Shipped, i: int) -> None:
    """One attempt to take an id, with a clean session that would wipe the victim's."""
    target = ["pantau-collector", "pantau-agent-room-1", "room-1"][i % 3]
    h = Client(b, target, "evil", tls=i % 2 == 0, v5=i % 4 < 2, clean=True)
    h.c.loop_start()
    h.connected.wait(5)
    h.close()


def test_no_account_can_take_the_collector_or_an_agent_id(tmp_path: Path, shipped: Shipped) -> None:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    sub = subscriber(shipped, store)
    sub.start()
    agent = Client(shipped, "pantau-agent-room-1", "room-1", tls=True).start()
    try:
        wait_until(sub.connected.is_set, 10)
        for i in range(8):
            hostile_once(shipped, i)
        time.sleep(0.5)
        assert sub.mqtt.disconnects == 0 and sub.health() == []
        assert agent.disconnects == [] and agent.connected.is_set()
        # the collector's persistent session survives a hostile clean start under its id
        sub.stop()
        for seq in range(1, 21):
            agent.c.publish("pantau/v1/agents/room-1/events", event(seq), qos=1).wait_for_publish(10)
        for i in range(0, 8, 3):  # "pantau-collector" over TLS and plain, MQTT 5 and 3.1.1
            hostile_once(shipped, i)
        sub = subscriber(shipped, store)
        sub.start()
        wait_until(lambda: stored(store, "room-1") == 20, 20, what="the 20 events queued in the collector's session")
        assert agent.disconnects == []
        log = (shipped.m.dir / "mosquitto.log").read_text()
        assert "as evil (" in log and "as pantau-agent-room-1 (" not in log
    finally:
        agent.close()
        sub.stop()
        store.close()


def test_200_of_200_events_stored_while_a_hostile_account_keeps_taking_ids(tmp_path: Path,
                                                                            shipped: Shipped) -> None:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    sub = subscriber(shipped, store)
    sub.start()
    agent = Client(shipped, "pantau-agent-room-1", "room-1", tls=True).start()
    stop = threading.Event()
    attempts = [0]

    def hostile() -> None:
        while not stop.is_set():
            hostile_once(shipped, attempts[0])
            attempts[0] += 1

    t = threading.Thread(target=hostile, daemon=True)
    try:
        wait_until(sub.connected.is_set, 10)
        t.start()
        infos = []
        for seq in range(1, 201):
            infos.append(agent.c.publish("pantau/v1/agents/room-1/events", event(seq), qos=1))
            time.sleep(0.01)
        for info in infos:
            info.wait_for_publish(20)
        assert all(i.rc == mqtt.MQTT_ERR_SUCCESS and i.is_published() for i in infos)
        wait_until(lambda: stored(store, "room-1") == 200, 30, what="200 stored")
        stop.set()
        t.join(20)
        assert attempts[0] >= 10, attempts
        assert stored(store, "room-1") == 200
        assert sub.mqtt.disconnects == 0 and agent.disconnects == [] and agent.connects == 1
    finally:
        stop.set()
        agent.close()
        sub.stop()
        store.close()


def test_an_oversized_publish_is_refused_and_never_reaches_the_collector(tmp_path: Path, shipped: Shipped) -> None:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    sub = subscriber(shipped, store)
    sub.start()
    try:
        wait_until(sub.connected.is_set, 10)
        # MQTT 3.1.1: the client cannot know the broker's limit and sends it all
        big = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="big", protocol=mqtt.MQTTv311)
        big.username_pw_set("evil", PASSWORDS["evil"])
        big.connect("127.0.0.1", shipped.port)
        big.loop(1.0)
        t0 = time.monotonic()
        big.publish("pantau/v1/agents/evil/events", b"x" * 30_000_000, qos=1)
        while big.loop(0.1) == mqtt.MQTT_ERR_SUCCESS and time.monotonic() - t0 < 10:
            pass
        cut_after = time.monotonic() - t0
        assert cut_after < 5, cut_after
        # a payload over 64 KiB but inside the packet cap reaches the collector, which keeps a dead letter
        agent = Client(shipped, "pantau-agent-room-1", "room-1").start()
        agent.c.publish("pantau/v1/agents/room-1/events", b'{"pad": "' + b"y" * 66_000 + b'"}', qos=1
                        ).wait_for_publish(10)
        agent.c.publish("pantau/v1/agents/room-1/events", event(1), qos=1).wait_for_publish(10)
        wait_until(lambda: stored(store, "room-1") == 1, 10)
        agent.close()
        time.sleep(0.5)
        dead = store.query("SELECT reason, topic FROM dead_letter")
        assert [(d["reason"], d["topic"]) for d in dead] == [("too_large", "pantau/v1/agents/room-1/events")]
        assert sub.received == 2  # the 30 MB message never came
        log = (shipped.m.dir / "mosquitto.log").read_text()
        assert "Client evil disconnected due to oversize packet" in log
    finally:
        sub.stop()
        store.close()
