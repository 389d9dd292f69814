"""The agent's MQTT session: will, retained state/inventory, and draining the outbox.

The connection itself is ``common.mqtt.Connector`` (shared with the collector): TLS with host
name verification, credentials, the fixed client id ``pantau-agent-<agent_id>``, the will,
MQTT 5 with the fall-back to 3.1.1 decided on the first attempts only, and reconnection with
jittered exponential back-off capped at ``reconnect_max_s``.

Each outbox row is handed to paho once per process (paho re-sends its own unacknowledged QoS 1
messages after a reconnect) and deleted on PUBACK; after a restart everything still in the
outbox is published again. At most ``inflight_max`` (< 65,535) messages are unacknowledged at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from agent.config import AgentConfig
from agent.spool import Outbox
from common.mqtt import MAX_INFLIGHT, ClientFactory, Connector, Handlers, MqttOptions, Will
from common.protocol import encode, topic_for, will_payload

log = logging.getLogger(__name__)


def options(cfg: AgentConfig, boot: str) -> MqttOptions:
    broker = cfg.broker_url
    password = cfg.password or broker.password
    return MqttOptions(
        broker=broker, client_id=f"pantau-agent-{cfg.agent_id}",
        username=cfg.username or broker.username or (cfg.agent_id if password else None), password=password,
        ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file, version=cfg.mqtt_version,
        persistent=False,  # the outbox, not the broker, keeps what is not yet delivered
        will=Will(topic_for(cfg.agent_id, "state", cfg.prefix), encode(will_payload(cfg.agent_id, boot))),
        reconnect_max_s=cfg.reconnect_max_s, inflight_max=min(cfg.inflight_max, MAX_INFLIGHT))


class Session:
    def __init__(self, cfg: AgentConfig, boot: str, outbox: Outbox, on_connected: Callable[[], None],
                 client_factory: ClientFactory | None = None) -> None:
        self.cfg = cfg
        self.boot = boot
        self.outbox = outbox
        self.on_connected = on_connected
        self.broker = cfg.broker_url
        self._published: dict[int, int] = {}  # paho mid -> outbox row id
        self._cursor = 0
        self._lock = threading.Lock()
        self.mqtt = Connector(options(cfg, boot), Handlers(on_connect=self._on_connect,
                                                           on_disconnect=self._on_disconnect,
                                                           on_publish=self._on_publish, on_idle=self.pump),
                              client_factory)
        self.connected = self.mqtt.connected

    @property
    def last_error(self) -> str | None:
        return self.mqtt.last_error

    @property
    def protocol(self) -> str:
        return self.mqtt.protocol_name

    def _on_connect(self, session_present: bool) -> None:
        log.info("connected to %s:%s (MQTT %s)", self.broker.host, self.broker.port, self.mqtt.protocol_name)
        try:
            self.on_connected()
        except Exception:
            log.exception("on_connected failed")

    def _on_disconnect(self, reason: str) -> None:
        log.warning("disconnected from broker: %s", reason)

    def _on_publish(self, mid: int) -> None:
        with self._lock:
            row_id = self._published.pop(mid, None)
        if row_id is not None:
            self.outbox.ack(row_id)

    # ------------------------------------------------------------------ pump
    def pump(self) -> int:
        """Hand outbox rows to paho, oldest first, within the in-flight window (network thread)."""
        sent = 0
        room = min(self.cfg.inflight_max, MAX_INFLIGHT) - len(self._published)
        if room <= 0 or not self.connected.is_set():
            return 0
        for row in self.outbox.pending(self._cursor, min(room, 500)):
            info = self.mqtt.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info is None or info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            with self._lock:
                if info.is_published():
                    self.outbox.ack(row.id)
                else:
                    self._published[info.mid] = row.id
            self._cursor = row.id
            sent += 1
        return sent

    def publish_now(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Fire-and-forget (telemetry): only while connected."""
        info = self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        return info is not None and info.rc == mqtt.MQTT_ERR_SUCCESS

    @property
    def inflight(self) -> int:
        return len(self._published)

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.mqtt.start()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (or the timeout passes)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.outbox.empty:
                return True
            time.sleep(0.05)
        return self.outbox.empty

    def stop(self) -> None:
        self.mqtt.stop()
