"""The collector's MQTT subscription: persistent session, QoS 1, ack only after commit.

Fixed client id and a persistent session (MQTT 5 session expiry, or ``clean_session=False``
on 3.1.1), so a restarted collector gets what the broker queued meanwhile. Subscribes on
every (re)connect, so a broker restart without persistence is recovered too. With a
``share_group`` (MQTT 5), several collectors split the stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector.ingest import Collector, Inbound
from common.config import Broker
from common.protocol import subscription_for

log = logging.getLogger(__name__)
CONNACK_TIMEOUT_S = 5.0


class Subscriber:
    def __init__(self, collector: Collector, broker: Broker, client_id: str = "pantau-collector",
                 prefix: str = "pantau", share_group: str | None = None, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, batch: int = 500,
                 mqtt_version: str = "auto") -> None:
        self.collector = collector
        self.broker = broker
        self.client_id = client_id
        self.topic = subscription_for(prefix)
        if share_group:
            self.topic = f"$share/{share_group}/{self.topic}"
        self.batch = batch
        self.username, self.password, self.ca_file = username, password, ca_file
        self.q: queue.Queue[tuple[str, bytes, float, int, int]] = queue.Queue(maxsize=20_000)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._protocol = mqtt.MQTTv311 if mqtt_version == "3.1.1" else mqtt.MQTTv5
        self._may_fall_back = mqtt_version == "auto"
        self.client = self._make_client()
        self._worker = threading.Thread(target=self._work, name="pantau-ingest", daemon=True)

    def _make_client(self) -> mqtt.Client:
        kwargs: dict = {"client_id": self.client_id, "protocol": self._protocol}
        if self._protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = False
        c = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        c.manual_ack_set(True)
        c.max_inflight_messages_set(1000)
        if self.broker.tls:
            c.tls_set(ca_certs=self.ca_file)
        if self.username or self.broker.username:
            c.username_pw_set(self.username or self.broker.username, self.password or self.broker.password)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.warning("broker refused the collector: %s", reason_code)
            if self._may_fall_back and self._protocol == mqtt.MQTTv5 and reason_code.value in (1, 132):
                self._fallback = True
                client.disconnect()
            return
        client.subscribe(self.topic, qos=1)
        self.connected.set()
        log.info("subscribed to %s on %s:%s", self.topic, self.broker.host, self.broker.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("collector lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        self.q.put((msg.topic, msg.payload, time.time(), msg.mid, msg.qos))

    def _work(self) -> None:
        while not self._stop.is_set() or not self.q.empty():
            try:
                first = self.q.get(timeout=0.2)
            except queue.Empty:
                if self.collector.has_dirty:
                    self.collector.classify_dirty()  # the stream went quiet: decide now
                continue
            items = [first]
            while len(items) < self.batch:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            batch = [Inbound(t, p, r) for t, p, r, _, _ in items]
            delay = 0.5
            while True:  # a batch that cannot be stored is retried, never dropped (QoS 0 has no re-send)
                try:
                    self.collector.ingest(batch)
                    break
                except Exception:
                    log.exception("storing a batch of %d failed; retrying in %.1f s", len(batch), delay)
                    if self._stop.wait(delay):
                        return  # unacknowledged QoS 1 messages come back on the next session
                    delay = min(30.0, delay * 2)
            for _, _, _, mid, qos in items:
                if qos > 0:
                    self.client.ack(mid, qos)

    def start(self) -> None:
        self._fallback = False
        props = None
        if self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 24 * 3600
        self._worker.start()
        clean = False if self._protocol == mqtt.MQTTv5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30, clean_start=clean,
                                  properties=props)
        self.client.loop_start()
        threading.Thread(target=self._watch_fallback, daemon=True).start()

    def _watch_fallback(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            if (self._may_fall_back and self._protocol == mqtt.MQTTv5 and not self.connected.is_set()
                    and time.monotonic() - started > CONNACK_TIMEOUT_S):
                self._fallback = True  # some 3.1.1-only brokers never answer an MQTT 5 CONNECT
            if getattr(self, "_fallback", False):
                log.info("broker does not speak MQTT 5; the collector falls back to 3.1.1")
                self.client.loop_stop()
                self._protocol = mqtt.MQTTv311
                self._fallback = False
                self.client = self._make_client()
                self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
                self.client.loop_start()
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10)
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
