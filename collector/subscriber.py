"""The collector's MQTT subscription: persistent session, QoS 1, ack only after commit.

The connection is ``common.mqtt.Connector`` (shared with the agent): fixed client id, a
persistent session (MQTT 5 session expiry, or ``clean_session=False`` on 3.1.1) so a restarted
collector gets what the broker queued meanwhile, MQTT 5 with the fall-back to 3.1.1 decided on
the first attempts only. Subscribes on every (re)connect, so a broker restart without
persistence is recovered too. With a ``share_group`` (MQTT 5), several collectors split the stream.

A message is acknowledged only after the batch holding it is committed, and only on the
connection that delivered it. While ``max_queue`` messages wait, the subscriber stops reading
from the socket: the broker keeps the rest (back-pressure instead of memory or loss).
``health()`` says what is wrong, in words; ``stats()`` gives numbers to export.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from collector.ingest import Collector, Inbound
from common.config import Broker
from common.mqtt import ClientFactory, Connector, Handlers, MqttOptions
from common.protocol import subscription_for

log = logging.getLogger(__name__)

# (topic, payload, received_at wall clock, mid, qos, connection generation, arrival monotonic)
_Item = tuple[str, bytes, float, int, int, int, float, bool]  # ..., retained


def describe(exc: BaseException) -> str:
    """``Class: message``, with the error it happened while handling (a failed rollback hides the cause)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    return f"{text} (while handling {type(cause).__name__}: {cause})" if cause is not None else text


class BatchStoring:
    """What every receiving side does with its batches (this subscriber, and ``collector.writer.Writer``):
    store each, retrying with back-off until it is stored or the side stops (a batch is never dropped:
    QoS 0 has no re-send), and classify what waits while the stream is quiet. Needs ``collector``,
    ``_stop`` and the counters below."""

    collector: Collector
    _stop: threading.Event
    batches = 0
    batch_failures = 0
    last_batch_error: str | None = None
    last_commit: float | None = None  # monotonic

    def _store_batch(self, batch: list[Inbound]) -> bool:
        """True once stored; False when stopping first (nothing acknowledged: the broker sends it again)."""
        delay = 0.5
        while True:
            try:
                self.collector.ingest(batch)
            except Exception as exc:
                self.batch_failures += 1
                self.last_batch_error = describe(exc)
                log.exception("storing a batch of %d failed; retrying in %.1f s", len(batch), delay)
                if self._stop.wait(delay):
                    return False
                delay = min(30.0, delay * 2)
                continue
            self.batches += 1
            self.last_commit = time.monotonic()
            self.last_batch_error = None
            return True

    def _quiet(self) -> None:
        """No batch came: decide now what waits to be classified."""
        if self.collector.has_dirty:
            try:
                self.collector.classify_dirty()
            except Exception:
                log.exception("classifying failed")


class Subscriber(BatchStoring):
    def __init__(self, collector: Collector, broker: Broker, client_id: str = "pantau-collector",
                 prefix: str = "pantau", share_group: str | None = None, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, batch: int = 500,
                 mqtt_version: str = "auto", max_queue: int = 20_000, unreachable_s: float = 30.0,
                 stalled_s: float = 30.0, client_factory: ClientFactory | None = None,
                 connack_timeout_s: float = 5.0) -> None:
        self.collector = collector
        self.broker = broker
        self.client_id = client_id
        self.topic = subscription_for(prefix)
        if share_group:
            self.topic = f"$share/{share_group}/{self.topic}"
        self.batch = batch
        self.max_queue = max_queue
        self.unreachable_s = unreachable_s
        self.stalled_s = stalled_s
        self.q: queue.Queue[_Item] = queue.Queue()  # bounded by back-pressure, never by blocking paho
        self._stop = threading.Event()
        self._in_hand = 0  # messages of the batch being stored
        self._oldest_in_hand: float | None = None
        self.started_at = time.monotonic()
        self.received = 0  # messages taken off the wire
        self.acked = 0
        self.ack_skipped = 0  # acks for a connection that was gone (the broker re-sends those)
        self.config_error: str | None = None
        self.mqtt = Connector(
            MqttOptions(broker=broker, client_id=client_id, username=username, password=password, ca_file=ca_file,
                        version=mqtt_version, persistent=True, manual_ack=True, reconnect_max_s=30.0,
                        connack_timeout_s=connack_timeout_s),
            Handlers(on_connect=self._on_connect, on_disconnect=self._on_disconnect, on_message=self._on_message,
                     may_read=self._may_read),
            client_factory)
        self.connected = self.mqtt.connected
        self._worker = threading.Thread(target=self._work, name="pantau-ingest", daemon=True)

    # ------------------------------------------------------------------ MQTT side (network thread)
    def _may_read(self) -> bool:
        return not self._stop.is_set() and self.queue_depth < self.max_queue

    def _on_connect(self, session_present: bool) -> None:
        if self.topic.startswith("$share/") and self.mqtt.protocol_name != "5":
            self.config_error = (f"shared subscription {self.topic!r} needs MQTT 5; this broker speaks 3.1.1 "
                                 "only and would treat it as a plain topic that nobody publishes to")
            log.error("%s", self.config_error)
            return
        self.mqtt.subscribe(self.topic, qos=1)
        log.info("subscribed to %s on %s:%s (MQTT %s, session %s)", self.topic, self.broker.host, self.broker.port,
                 self.mqtt.protocol_name, "resumed" if session_present else "new")

    def _on_disconnect(self, reason: str) -> None:
        if not self._stop.is_set():
            log.warning("collector lost the broker (%s); reconnecting", reason)

    def _on_message(self, msg: mqtt.MQTTMessage, generation: int) -> None:
        self.received += 1
        self.q.put((msg.topic, bytes(msg.payload), time.time(), msg.mid, msg.qos, generation, time.monotonic(),
                    bool(msg.retain)))

    # ------------------------------------------------------------------ ingest side (worker thread)
    def _take(self) -> list[_Item] | None:
        try:
            first = self.q.get(timeout=0.2)
        except queue.Empty:
            return None
        items = [first]
        self._in_hand, self._oldest_in_hand = 1, first[6]
        while len(items) < self.batch:
            try:
                items.append(self.q.get_nowait())
            except queue.Empty:
                break
            self._in_hand += 1
        return items

    def _work(self) -> None:
        while not self._stop.is_set() or not self.q.empty():
            items = self._take()
            if items is None:
                self._quiet()
                continue
            try:
                if not self._store(items):
                    return  # stopping: unacknowledged QoS 1 messages come back on the next session
                for _, _, _, mid, qos, generation, _, _ in items:
                    if qos > 0:
                        if self.mqtt.ack(mid, qos, generation):
                            self.acked += 1
                        else:
                            self.ack_skipped += 1
            finally:
                self._in_hand, self._oldest_in_hand = 0, None

    def _store(self, items: list[_Item]) -> bool:
        return self._store_batch([Inbound(t, p, r, from_broker=True, retained=retained)
                                  for t, p, r, _, _, _, _, retained in items])

    # ------------------------------------------------------------------ health and numbers
    @property
    def queue_depth(self) -> int:
        return self.q.qsize() + self._in_hand

    def seconds_since_commit(self, now: float | None = None) -> float:
        """Since the last committed batch (or since start, before the first)."""
        return (now or time.monotonic()) - (self.last_commit or self.started_at)

    def _oldest_waiting(self) -> float | None:
        if self._oldest_in_hand is not None:
            return self._oldest_in_hand
        with self.q.mutex:
            return self.q.queue[0][6] if self.q.queue else None

    def health(self) -> list[str]:
        """Reasons the collector is not taking in evidence, in words; empty when healthy."""
        now = time.monotonic()
        out = []
        down = self.mqtt.down_since
        if down is not None and now - down > self.unreachable_s:
            out.append(f"not connected to the MQTT broker {self.broker.host}:{self.broker.port} for "
                       f"{now - down:.0f} s: {self.mqtt.last_error or 'connecting'}")
        oldest = self._oldest_waiting()
        if oldest is not None and now - oldest > self.stalled_s and self.seconds_since_commit(now) > self.stalled_s:
            out.append(f"{self.queue_depth} messages waiting, no batch committed for "
                       f"{self.seconds_since_commit(now):.0f} s")
        if self.last_batch_error is not None:
            out.append(f"storing the last batch failed: {self.last_batch_error}")
        if self.config_error is not None:
            out.append(self.config_error)
        taken = self.mqtt.last_taken_over
        if taken is not None and now - taken < 300:
            out.append(f"the broker handed client id {self.client_id!r} to another connection "
                       f"{now - taken:.0f} s ago ({self.mqtt.taken_over} time(s) in all)")
        return out

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected.is_set(), "protocol": self.mqtt.protocol_name,
                "queue_depth": self.queue_depth, "seconds_since_commit": round(self.seconds_since_commit(), 3),
                "received": self.received, "batches": self.batches, "batch_failures": self.batch_failures,
                "acked": self.acked, "ack_skipped": self.ack_skipped, "connects": self.mqtt.connects,
                "disconnects": self.mqtt.disconnects, "taken_over": self.mqtt.taken_over}

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.started_at = time.monotonic()
        self._worker.start()
        self.mqtt.start()

    def stop(self) -> None:
        """Finish (and acknowledge) what is in hand, then disconnect."""
        self._stop.set()
        self._worker.join(timeout=10)
        self.mqtt.stop()
