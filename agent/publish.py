"""The MQTT session: will, retained state/inventory, and draining the outbox.

MQTT 5 where the broker speaks it, 3.1.1 otherwise. A fixed client id; TLS with
hostname verification always on; reconnect with jittered exponential back-off capped at
60 s. Each outbox row is handed to paho once per process (paho re-sends its own
unacknowledged QoS 1 messages after a reconnect) and deleted on PUBACK; after a restart
everything still in the outbox is published again. At most ``inflight_max`` (< 65,535)
messages are unacknowledged at once.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.spool import Outbox
from common.protocol import encode, topic_for, will_payload

log = logging.getLogger(__name__)
MAX_INFLIGHT = 65_000
_UNSUPPORTED_PROTOCOL = (1, 132)
CONNACK_TIMEOUT_S = 5.0


def backoff_delays(cap: float = 60.0, base: float = 1.0, rng: random.Random | None = None):  # type: ignore[no-untyped-def]
    """Full-jitter exponential back-off: uniform(0.5, 1) x min(cap, base x 2^n)."""
    r = rng or random.Random()
    n = 0
    while True:
        yield min(cap, base * (2 ** n)) * r.uniform(0.5, 1.0)
        n = min(n + 1, 16)


class Session:
    def __init__(self, cfg: AgentConfig, boot: str, outbox: Outbox, on_connected: Callable[[], None]) -> None:
        self.cfg = cfg
        self.boot = boot
        self.outbox = outbox
        self.on_connected = on_connected
        self.broker = cfg.broker_url
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._published: dict[int, int] = {}
        self._cursor = 0
        self._lock = threading.Lock()
        self._protocol = mqtt.MQTTv311 if cfg.mqtt_version == "3.1.1" else mqtt.MQTTv5
        self._may_fall_back = cfg.mqtt_version == "auto"
        self._fallback = False
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.client = self._make_client()

    # ------------------------------------------------------------------ client
    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        kwargs: dict[str, Any] = {"client_id": f"pantau-agent-{cfg.agent_id}", "protocol": self._protocol}
        if self._protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = True
        c = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        c.will_set(topic_for(cfg.agent_id, "state", cfg.prefix), encode(will_payload(cfg.agent_id, self.boot)),
                   qos=1, retain=True)
        if self.broker.tls:
            c.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                      cert_reqs=ssl.CERT_REQUIRED)
            c.tls_insecure_set(False)
        password = cfg.password or self.broker.password
        username = cfg.username or self.broker.username or (cfg.agent_id if password else None)
        if username:
            c.username_pw_set(username, password)
        c.max_inflight_messages_set(min(cfg.inflight_max, MAX_INFLIGHT))
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        return c

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            if self._may_fall_back and self._protocol == mqtt.MQTTv5 and reason_code.value in _UNSUPPORTED_PROTOCOL:
                self._fallback = True
            log.warning("%s", self.last_error)
            return
        self.last_error = None
        log.info("connected to %s:%s (MQTT %s)", self.broker.host, self.broker.port,
                 "5" if self._protocol == mqtt.MQTTv5 else "3.1.1")
        self.connected.set()
        try:
            self.on_connected()
        except Exception:
            log.exception("on_connected failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if self.connected.is_set():
            log.warning("disconnected from broker: %s", reason_code)
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            row_id = self._published.pop(mid, None)
        if row_id is not None:
            self.outbox.ack(row_id)

    # ------------------------------------------------------------------ pump
    def pump(self) -> int:
        """Hand outbox rows to paho, oldest first, within the in-flight window."""
        sent = 0
        room = min(self.cfg.inflight_max, MAX_INFLIGHT) - len(self._published)
        if room <= 0 or not self.connected.is_set():
            return 0
        for row in self.outbox.pending(self._cursor, min(room, 500)):
            info = self.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
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
        if not self.connected.is_set():
            return False
        return self.client.publish(topic, payload, qos=qos, retain=retain).rc == mqtt.MQTT_ERR_SUCCESS

    @property
    def inflight(self) -> int:
        return len(self._published)

    # ------------------------------------------------------------------ loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pantau-mqtt", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delays = backoff_delays(self.cfg.reconnect_max_s)
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self.client.connect(self.broker.host, self.broker.port, keepalive=30)
                    first = False
                else:
                    self.client.reconnect()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"cannot reach broker {self.broker.host}:{self.broker.port}: {exc}"
                log.warning("%s", self.last_error)
                self._stop.wait(next(delays))
                continue
            started = time.monotonic()
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if (not self.connected.is_set() and self._protocol == mqtt.MQTTv5 and self._may_fall_back
                        and time.monotonic() - started > CONNACK_TIMEOUT_S):
                    # Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT with a will.
                    self._fallback = True
                    break
                if self.connected.is_set():
                    delays = backoff_delays(self.cfg.reconnect_max_s)
                    self.pump()
            self.connected.clear()
            if self._fallback:
                try:
                    self.client.disconnect()
                except Exception as exc:
                    log.debug("dropping the MQTT 5 attempt: %s", exc)
                log.info("broker does not speak MQTT 5; falling back to 3.1.1")
                self._protocol, self._fallback, first = mqtt.MQTTv311, False, True
                self.client = self._make_client()
                continue
            if not self._stop.is_set():
                self._stop.wait(next(delays))

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (or the timeout passes)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.outbox.empty:
                return True
            time.sleep(0.05)
        return self.outbox.empty

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.connected.is_set() or self.client.is_connected():
                self.client.disconnect()
                self.client.loop(timeout=0.2)
        except Exception as exc:  # closing a dead socket
            log.debug("disconnect: %s", exc)
        self.connected.clear()
