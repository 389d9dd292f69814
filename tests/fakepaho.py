"""A stand-in for paho's ``Client`` and a scripted broker behind it, for unit tests.

Real paho types travel through it (ReasonCode, Properties, ConnectFlags, MQTTMessage,
MQTTMessageInfo); each connection has a real socketpair, so ``select`` works as with a
broker. The broker can refuse MQTT 5 (reason 132 or 1), stay silent to an MQTT 5 CONNECT (like
amqtt when a will is set), be unreachable, drop connections, deliver messages and record every
acknowledgement with the client it arrived on.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


class FakeBroker:
    def __init__(self, v5: str = "yes") -> None:
        self.v5 = v5  # yes | refuse132 | refuse1 | silent
        self.reachable = True
        self.refuse_all: int | None = None  # a CONNACK reason for every attempt (e.g. 135 not authorised)
        self.lock = threading.Lock()
        self.clients: list[FakeClient] = []
        self.connects: list[dict[str, Any]] = []
        self.acks: list[tuple[FakeClient, int, bool]] = []  # client, mid, sent on the live connection
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.subscriptions: list[tuple[FakeClient, str]] = []
        self.live: FakeClient | None = None  # the connection the broker accepted last
        self.session: dict[int, tuple[str, bytes]] = {}  # unacknowledged QoS 1 deliveries, by mid
        self._mid = 0

    def factory(self, api: Any, client_id: str = "", protocol: int = mqtt.MQTTv311,
                clean_session: bool | None = None) -> FakeClient:
        c = FakeClient(self, client_id, protocol, clean_session)
        self.clients.append(c)
        return c

    # ------------------------------------------------------------------ driving it from a test
    def deliver(self, topic: str, payload: bytes, qos: int = 1) -> int:
        with self.lock:
            c = self.live
            assert c is not None and c.is_connected(), "no live connection to deliver to"
            self._mid = self._mid % 65535 + 1
            mid = self._mid
            if qos:
                self.session[mid] = (topic, payload)
        c.push(("message", mid, topic, payload, qos, False))
        return mid

    def drop(self) -> None:
        """The connection breaks (broker restart, network)."""
        c = self.live
        if c is not None:
            c.push(("drop",))

    def take_over(self) -> None:
        """Another connection with the same client id (MQTT 5 reason 142)."""
        c = self.live
        if c is not None:
            c.push(("takeover",))

    # ------------------------------------------------------------------ what the client does
    def on_connect(self, c: FakeClient, clean: bool, props: Properties | None) -> None:
        with self.lock:
            self.connects.append({"client": c, "protocol": c.protocol, "client_id": c.client_id, "clean": clean,
                                  "will": c.will, "expiry": getattr(props, "SessionExpiryInterval", None)})
        v5 = c.protocol == mqtt.MQTTv5
        if self.refuse_all is not None:
            c.push(("connack", self.refuse_all, False))
        elif v5 and self.v5 == "silent":
            return
        elif v5 and self.v5 in ("refuse132", "refuse1"):
            c.push(("connack", 132 if self.v5 == "refuse132" else 1, False))
        else:
            with self.lock:
                present = not clean and bool(self.connects[:-1])
                self.live = c
            c.push(("connack", 0, present))
            if present:  # a resumed session gets what was not acknowledged, with the same mids
                for mid, (topic, payload) in sorted(self.session.items()):
                    c.push(("message", mid, topic, payload, 1, True))

    def on_ack(self, c: FakeClient, mid: int) -> None:
        with self.lock:
            live = c is self.live and c.is_connected()
            self.acks.append((c, mid, live))
            if live:
                self.session.pop(mid, None)


class FakeClient:
    def __init__(self, broker: FakeBroker, client_id: str, protocol: int, clean_session: bool | None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.protocol = protocol
        self.clean_session = clean_session
        self.will: tuple[str, bytes, int, bool] | None = None
        self.tls: dict[str, Any] | None = None
        self.credentials: tuple[str, str | None] | None = None
        self.manual_ack = False
        self.connect_timeout = 5.0
        self.on_connect: Any = None
        self.on_disconnect: Any = None
        self.on_message: Any = None
        self.on_publish: Any = None
        self._sock: socket.socket | None = None
        self._peer: socket.socket | None = None
        self._inbox: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._connected = False
        self._mid = 0

    # configuration, as paho
    def will_set(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.will = (topic, payload, qos, retain)

    def tls_set(self, **kw: Any) -> None:
        self.tls = kw

    def tls_insecure_set(self, value: bool) -> None:
        assert value is False

    def username_pw_set(self, username: str, password: str | None = None) -> None:
        self.credentials = (username, password)

    def max_inflight_messages_set(self, n: int) -> None:
        self.inflight = n

    def max_queued_messages_set(self, n: int) -> None:
        self.queued = n

    def manual_ack_set(self, on: bool) -> None:
        self.manual_ack = on

    # the connection
    def connect(self, host: str, port: int, keepalive: int = 60, clean_start: Any = None,
                properties: Properties | None = None) -> int:
        if not self.broker.reachable:
            raise ConnectionRefusedError(111, "Connection refused")
        self._close()
        self._sock, self._peer = socket.socketpair()
        self._sock.setblocking(False)
        self._peer.setblocking(False)
        clean = bool(clean_start) if self.protocol == mqtt.MQTTv5 else bool(self.clean_session)
        self.broker.on_connect(self, clean, properties)
        return mqtt.MQTT_ERR_SUCCESS

    def push(self, event: tuple[Any, ...]) -> None:
        with self._lock:
            self._inbox.append(event)
            peer = self._peer
        if peer is not None:
            try:
                peer.send(b"x")  # a wake-up; when the buffer is full one is already waiting
            except (BlockingIOError, OSError):
                pass

    def socket(self) -> socket.socket | None:
        return self._sock

    def is_connected(self) -> bool:
        return self._connected

    def want_write(self) -> bool:
        return False

    def loop_write(self) -> int:
        return mqtt.MQTT_ERR_SUCCESS if self._sock is not None else mqtt.MQTT_ERR_NO_CONN

    def loop_misc(self) -> int:
        return mqtt.MQTT_ERR_SUCCESS if self._sock is not None else mqtt.MQTT_ERR_NO_CONN

    def loop_read(self, max_packets: int = 1) -> int:
        if self._sock is None:
            return mqtt.MQTT_ERR_NO_CONN
        try:
            self._sock.recv(4096)
        except BlockingIOError:
            pass
        with self._lock:
            events, self._inbox = self._inbox, []
        for ev in events:
            rc = self._handle(ev)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return rc
        return mqtt.MQTT_ERR_SUCCESS

    def _handle(self, ev: tuple[Any, ...]) -> int:
        kind = ev[0]
        if kind == "connack":
            _, code, present = ev
            rc = ReasonCode(PacketTypes.CONNACK, identifier=code) if code in (0, 132, 135, 134) else _Code(code)
            if code == 0:
                self._connected = True
            self.on_connect(self, None, mqtt.ConnectFlags(session_present=present), rc, Properties(PacketTypes.CONNACK))
            if code != 0:
                self._close()
                return mqtt.MQTT_ERR_CONN_REFUSED
        elif kind == "message":
            _, mid, topic, payload, qos, dup = ev
            msg = mqtt.MQTTMessage(mid, topic.encode())
            msg.payload, msg.qos, msg.dup = payload, qos, dup
            self.on_message(self, None, msg)
        elif kind == "puback":
            self.on_publish(self, None, ev[1], ReasonCode(PacketTypes.PUBACK), Properties(PacketTypes.PUBACK))
        elif kind in ("drop", "takeover"):
            was = self._connected
            self._close()
            if was:
                code = 142 if kind == "takeover" else 0
                reason = ReasonCode(PacketTypes.DISCONNECT, identifier=code) if code else _Code(7, "connection lost")
                self.on_disconnect(self, None, mqtt.DisconnectFlags(kind == "takeover"), reason, None)
            return mqtt.MQTT_ERR_CONN_LOST
        return mqtt.MQTT_ERR_SUCCESS

    def _close(self) -> None:
        self._connected = False
        for s in (self._sock, self._peer):
            if s is not None:
                s.close()
        self._sock = self._peer = None

    def disconnect(self, reasoncode: Any = None, properties: Any = None) -> int:
        was = self._connected
        self._close()
        if was and self.on_disconnect is not None:
            self.on_disconnect(self, None, mqtt.DisconnectFlags(False), ReasonCode(PacketTypes.DISCONNECT), None)
        return mqtt.MQTT_ERR_SUCCESS

    # messages
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        self._mid += 1
        info = mqtt.MQTTMessageInfo(self._mid)
        if not self._connected:
            info.rc = mqtt.MQTT_ERR_NO_CONN
            return info
        self.broker.published.append((topic, payload, qos, retain))
        if qos:
            self.push(("puback", self._mid))
        else:
            info._set_as_published()
        return info

    def subscribe(self, topic: str, qos: int = 0) -> tuple[int, int]:
        self.broker.subscriptions.append((self, topic))
        return mqtt.MQTT_ERR_SUCCESS, self._mid

    def ack(self, mid: int, qos: int) -> int:
        assert self.manual_ack
        self.broker.on_ack(self, mid)  # recorded even on a dead connection: tests look for those
        return mqtt.MQTT_ERR_SUCCESS if self._connected else mqtt.MQTT_ERR_NO_CONN


class _Code:
    """A reason code paho has no name for in a CONNACK (a 3.1.1 refusal code read as MQTT 5)."""

    def __init__(self, value: int, name: str = "") -> None:
        self.value = value
        self.name = name or f"code {value}"
        self.is_failure = value != 0

    def __str__(self) -> str:
        return self.name
