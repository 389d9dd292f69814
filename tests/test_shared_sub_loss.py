"""Messages lost through the collector's shared subscription on Mosquitto 2.0 (issue #16, item 3), and the
shipped broker setting that prevents it, on a real Mosquitto.

Mosquitto 2.0 (src/subs.c, ``subs__shared_process``) hands each message of a shared subscription
(``$share/<group>/...``) to the next member of the group in turn, whether that member is connected or
not. A member that is away but whose session lives (the collector's receivers keep persistent sessions,
so that what they had not acknowledged comes back) is still given its share: at QoS 0 the broker
discards it on the spot (``db__message_insert``: a QoS 0 message for a client without a socket), with no
log line, and the QoS 0 packets already waiting on the member's socket when it dropped are lost with
the connection. Any absence does it: a receiver restarted (stopped, or killed and started again by the
writer), or cut off by its keep-alive after a stall. Separately, a connected member that stalls is cut
off at QoS 0 once 1,000 packets wait for it, under Mosquitto's default cap.

The shipped configuration (deploy/mosquitto/pantau.conf) delivers at the QoS of the subscription
(``upgrade_outgoing_qos true``; the collector subscribes at 1 and acknowledges after commit): an absent
member's share waits in its session and what it had not acknowledged is sent again. Each test runs the
same stream through a broker with the shipped settings but that one at Mosquitto's default (or with
Mosquitto's default caps), where messages are lost, and through one with the shipped settings, where
none are. Every message carries a sequence number; losses are counted exactly.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.config import parse_broker
from common.mqtt import Connector, Handlers, MqttOptions
from tests.conftest import ROOT, Mosquitto
from tests.procs import wait_until

pytestmark = pytest.mark.broker

CONF = ROOT / "deploy" / "mosquitto" / "pantau.conf"
DELIVERY = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "upgrade_outgoing_qos",
            "queue_qos0_messages")
TOPIC = "$share/pantau-ingest/pantau/v1/agents/+/+"  # the collector's receivers' subscription
PROBE = b"probe"


def shipped_settings() -> dict[str, str]:
    """The broker-wide delivery settings of deploy/mosquitto/pantau.conf."""
    out = {}
    for line in CONF.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] in DELIVERY:
            out[words[0]] = words[1]
    assert out.get("upgrade_outgoing_qos") == "true", "pantau.conf no longer delivers at the subscription's QoS"
    return out


SHIPPED = shipped_settings()
WITHOUT_UPGRADE = {**SHIPPED, "upgrade_outgoing_qos": "false"}  # Mosquitto's default for that one line
MOSQUITTO_DEFAULTS = {"max_queued_messages": "1000", "max_queued_bytes": "0", "max_inflight_messages": "20",
                      "upgrade_outgoing_qos": "false"}


@contextmanager
def broker(settings: dict[str, str]) -> Iterator[Mosquitto]:
    """A Mosquitto on a free 127.0.0.1 port with these settings (they follow, so override, the fixture's)."""
    m = Mosquitto(extra="\n".join(f"{k} {v}" for k, v in settings.items()))
    try:
        yield m.start()
    finally:
        m.close()


def broker_log(m: Mosquitto) -> str:
    return (m.dir / "mosquitto.log").read_text(errors="replace")


class Seen:
    """Sequence numbers received, by all members together."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seqs: Counter[int] = Counter()
        self.probes: set[str] = set()

    def add(self, member: str, payload: bytes) -> None:
        with self.lock:
            if payload == PROBE:
                self.probes.add(member)
            else:
                self.seqs[int(payload[:10])] += 1

    def unique(self) -> int:
        with self.lock:
            return len(self.seqs)

    def missing(self, n: int) -> list[int]:
        with self.lock:
            return [s for s in range(n) if s not in self.seqs]


class Member:
    """A member of the shared subscription as a receiver is one: fixed client id, persistent session, a
    QoS 1 subscription made on every connect, each message acknowledged once it is stored (here:
    recorded). ``stall_at``: the connection's thread stops for ``stall_s`` on the first message it gets
    from that sequence number on."""

    def __init__(self, port: int, client_id: str, seen: Seen, version: str = "3.1.1", keepalive: int = 30,
                 stall_at: int | None = None, stall_s: float = 0.0) -> None:
        self.client_id, self.seen = client_id, seen
        self.stall_at, self.stall_s = stall_at, stall_s
        self.mqtt = Connector(
            MqttOptions(broker=parse_broker(f"mqtt://127.0.0.1:{port}"), client_id=client_id, version=version,
                        persistent=True, manual_ack=True, keepalive=keepalive, reconnect_base_s=0.5,
                        reconnect_max_s=2.0),
            Handlers(on_connect=lambda _: self.mqtt.subscribe(TOPIC, qos=1), on_message=self._on_message))

    def _on_message(self, msg: Any, generation: int) -> None:
        payload = bytes(msg.payload)
        if self.stall_at is not None and payload != PROBE and int(payload[:10]) >= self.stall_at:
            self.stall_at = None
            time.sleep(self.stall_s)  # a stall: nothing read, nothing sent (no keep-alive either)
        self.seen.add(self.client_id, payload)
        self.mqtt.ack(msg.mid, msg.qos, generation)

    def start(self) -> Member:
        self.mqtt.start()
        wait_until(self.mqtt.connected.is_set, 10, what=f"{self.client_id} connected")
        return self

    def stop(self) -> None:
        self.mqtt.stop()


class Publisher:
    """An agent's side: QoS 0 publishes at a steady rate, each payload starting with its sequence number."""

    def __init__(self, port: int, size: int = 300) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="shared-sub-publisher")
        self.c.max_queued_messages_set(0)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.pad = b"x" * max(0, size - 10)

    def probe_until(self, seen: Seen, members: int) -> None:
        """Publish probes until every member got one: all subscriptions are in place."""
        end = time.monotonic() + 10
        while len(seen.probes) < members:
            assert time.monotonic() < end, f"only {sorted(seen.probes)} of {members} members subscribed"
            self.c.publish("pantau/v1/agents/probe/telemetry", PROBE, qos=0)
            time.sleep(0.05)

    def stream(self, n: int, rate: float, at: dict[int, Callable[[], None]] | None = None,
               topic: Callable[[int], str] = lambda s: f"pantau/v1/agents/a{s % 20}/telemetry",
               payload: Callable[[int], bytes] | None = None) -> None:
        """``n`` messages at ``rate`` a second; ``at[k]`` runs once ``k`` are published."""
        t0 = time.monotonic()
        for s in range(n):
            self.c.publish(topic(s), payload(s) if payload else b"%010d" % s + self.pad, qos=0)
            if s % 100 == 99:
                ahead = (s + 1) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            if at and s + 1 in at:
                at[s + 1]()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def settle(count: Callable[[], int], n: int, quiet_s: float = 2.0, limit_s: float = 20.0) -> int:
    """Wait until ``count()`` reaches ``n`` or stops growing for ``quiet_s``; returns it."""
    end = time.monotonic() + limit_s
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        c = count()
        if c >= n:
            time.sleep(0.3)  # duplicates re-sent after a reconnect may still come; they change nothing here
            return count()
        if c != last:
            last, since = c, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            break
        time.sleep(0.1)
    return count()


# ---------------------------------------------------------------------------------------------- a member away

def run_member_away(settings: dict[str, str], version: str, how: str) -> tuple[int, int, str]:
    """Two members; member 1 goes away mid-stream and comes back with its session. (lost, sent, broker log)"""
    n, rate = 6000, 3000.0
    with broker(settings) as m:
        seen = Seen()
        # keep-alive 1 s: the broker ends a connection silent for more than 1 s, checking every 5-6 s
        stall = {"stall_at": 600, "stall_s": 9.0, "keepalive": 1} if how == "stall" else {}
        members = [Member(m.port, "pantau-collector-r0", seen, version).start(),
                   Member(m.port, "pantau-collector-r1", seen, version, **stall).start()]  # type: ignore[arg-type]
        pub = Publisher(m.port)
        try:
            pub.probe_until(seen, 2)
            at: dict[int, Callable[[], None]] = {}
            if how == "restart":  # stopped (as a receiver is), and started again a second later
                def leave() -> None:
                    members[1].stop()
                    threading.Timer(1.0, lambda: members.append(
                        Member(m.port, "pantau-collector-r1", seen, version).start())).start()
                at[1500] = leave
            elif how == "stall":  # stalled past 1.5 x its keep-alive: the broker ends the connection
                rate = 600.0  # the stream goes on until the member is back
            pub.stream(n, rate, at)
            got = settle(seen.unique, n, quiet_s=3.0)
        finally:
            pub.close()
            time.sleep(0.2)
            for mb in members:
                mb.stop()
        return n - got, n, broker_log(m)


@pytest.mark.parametrize("version", ["3.1.1", "5"])
@pytest.mark.parametrize("shipped", [False, True], ids=["upgrade_outgoing_qos false", "shipped"])
def test_a_member_restarted_loses_its_qos0_share_unless_the_broker_upgrades_to_qos1(version: str,
                                                                                   shipped: bool) -> None:
    lost, n, log = run_member_away(SHIPPED if shipped else WITHOUT_UPGRADE, version, "restart")
    print(f"member restarted, MQTT {version}, {'shipped' if shipped else 'without upgrade'}: lost {lost} of {n}")
    if shipped:
        assert lost == 0, f"{lost} of {n} messages lost with the shipped settings"
    else:
        assert lost > 0, f"no loss with upgrade_outgoing_qos false: the condition was not reproduced ({n} sent)"
        assert "being dropped" not in log  # silent: the broker says nothing about these


@pytest.mark.parametrize("shipped", [False, True], ids=["upgrade_outgoing_qos false", "shipped"])
def test_a_member_stalled_past_its_keepalive_loses_its_qos0_share_unless_the_broker_upgrades(shipped: bool) -> None:
    lost, n, log = run_member_away(SHIPPED if shipped else WITHOUT_UPGRADE, "3.1.1", "stall")
    print(f"member stalled past keep-alive, {'shipped' if shipped else 'without upgrade'}: lost {lost} of {n}")
    assert "exceeded timeout" in log, "the stalled member was not disconnected by the broker"
    if shipped:
        assert lost == 0, f"{lost} of {n} messages lost with the shipped settings"
    else:
        assert lost > 0, f"no loss with upgrade_outgoing_qos false ({n} sent)"


# ---------------------------------------------------------------------------------------------- a queue bound

def run_stalled_connected(settings: dict[str, str]) -> tuple[int, int, str]:
    """Member 1 stops reading for 4 s (connection kept) while 2 KB messages keep coming."""
    n = 16000
    with broker(settings) as m:
        seen = Seen()
        members = [Member(m.port, "pantau-collector-r0", seen).start(),
                   Member(m.port, "pantau-collector-r1", seen, stall_at=401, stall_s=4.0).start()]
        pub = Publisher(m.port, size=2048)
        try:
            pub.probe_until(seen, 2)
            pub.stream(n, 8000.0)
            got = settle(seen.unique, n, quiet_s=3.0)
        finally:
            pub.close()
            for mb in members:
                mb.stop()
        return n - got, n, broker_log(m)


@pytest.mark.parametrize("shipped", [False, True], ids=["Mosquitto's defaults", "shipped"])
def test_a_stalled_member_loses_qos0_past_mosquittos_default_cap_and_nothing_with_the_shipped_caps(
        shipped: bool) -> None:
    lost, n, log = run_stalled_connected(SHIPPED if shipped else MOSQUITTO_DEFAULTS)
    print(f"connected member stalled 4 s, {'shipped' if shipped else 'defaults'}: lost {lost} of {n}")
    if shipped:
        assert lost == 0 and "being dropped" not in log, f"{lost} of {n} messages lost with the shipped settings"
    else:
        assert lost > 0 and "Outgoing messages are being dropped" in log, f"lost {lost} of {n} under the defaults"


# ---------------------------------------------------------------------------------------------- the collector

def telemetry(s: int) -> bytes:
    agent, seq = f"share-{s % 20:02d}", s // 20 + 1
    return json.dumps({"v": 1, "agent": agent, "boot": "shareboot01", "seq": seq, "kind": "telemetry",
                       "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_800_000_000 + seq)) + ".000Z",
                       "host": {"cpu_pct": 3.5, "mem_pct": 41.0, "disk_pct": 63.2, "uptime_s": 86400},
                       "devices": []}, separators=(",", ":")).encode()


def run_receiver_killed(settings: dict[str, str], tmp: Path) -> tuple[int, int, int]:
    """The collector's writer with two receiver processes; receiver 1 is killed -9 mid-stream and the
    writer starts it again. (lost, sent, receiver restarts)"""
    from collector.config import CollectorConfig
    from collector.ingest import Collector
    from collector.store.sqlite import SqliteStore
    from collector.writer import Writer

    n = 8000
    db = tmp / "c.sqlite"
    with broker(settings) as m:
        store = SqliteStore(str(db))
        w = Writer(Collector(store, classify=False), CollectorConfig(broker=m.url, db=str(db)), 2)
        pub = None
        try:
            w.start()
            wait_until(lambda: all(w.status.get(i, ({}, 0))[0].get("connected") for i in range(2)), 20,
                       what="both receivers connected")
            time.sleep(0.5)  # their SUBSCRIBE follows the CONNACK

            def stored() -> int:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                    return int(c.execute("SELECT count(*) FROM seen").fetchone()[0])

            pub = Publisher(m.port)
            pub.stream(n, 2000.0, {2000: lambda: w.procs[1].kill()},
                       topic=lambda s: f"pantau/v1/agents/share-{s % 20:02d}/telemetry", payload=telemetry)
            got = settle(stored, n, quiet_s=4.0, limit_s=25.0)
        finally:
            if pub is not None:
                pub.close()
            w.stop()
            store.close()
        return n - got, n, w.restarts


@pytest.mark.parametrize("shipped", [False, True], ids=["upgrade_outgoing_qos false", "shipped"])
def test_a_receiver_killed_and_restarted_loses_nothing_with_the_shipped_broker(tmp_path: Path,
                                                                               shipped: bool) -> None:
    lost, n, restarts = run_receiver_killed(SHIPPED if shipped else WITHOUT_UPGRADE, tmp_path)
    print(f"receiver killed -9, {'shipped' if shipped else 'without upgrade'}: lost {lost} of {n}")
    assert restarts == 1
    if shipped:
        assert lost == 0, f"{lost} of {n} messages lost with the shipped settings"
    else:
        assert lost > 0, f"no loss with upgrade_outgoing_qos false ({n} sent)"
