"""One MQTT connection for the agent and the collector.

TLS (CA, optional client certificate) with host name verification, credentials, a fixed client
id, an optional persistent session (MQTT 5 session expiry, or ``clean_session=False`` on 3.1.1),
an optional will, and reconnection with jittered exponential back-off.

MQTT 5 where the broker speaks it, 3.1.1 otherwise. The fall-back is decided on the first
connection attempts only, before anything has connected: a refusal with reason 1 or 132, or a
CONNECT that gets no CONNACK at all (amqtt never answers an MQTT 5 CONNECT carrying a will).
Once a connection succeeded, the protocol and the paho client are fixed for the life of the
Connector: a later broker restart or outage never drops to 3.1.1 and never swaps the client.

One network thread owns the socket (``select`` plus paho's ``loop_read``/``loop_write``/
``loop_misc``). Every call into paho, from any thread, holds one lock, so two threads never write
to the socket at once. paho's callbacks only record what happened; the handlers run after the
lock is released, on the network thread. Each successful connection has a generation number:
an acknowledgement is sent only on the connection that delivered the message (after a reconnect
the broker re-sends whatever was not acknowledged, and a mid of an old connection may name
another message on the new one).
"""

from __future__ import annotations

import logging
import random
import select
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.config import Broker

log = logging.getLogger(__name__)

UNSUPPORTED_PROTOCOL = (1, 132)  # 3.1.1 "unacceptable protocol version", MQTT 5 "unsupported protocol version"
SESSION_TAKEN_OVER = 142
SHORT_LIVED_S, SHORT_LIVED_WARN = 5.0, 3  # connections ended by the broker this soon, this often in a row
MAX_INFLIGHT = 65_000  # paho's message ids collide past 65,535 unacknowledged messages
VERSIONS = ("auto", "5", "3.1.1")


def backoff_delays(cap: float = 60.0, base: float = 1.0, rng: random.Random | None = None) -> Iterator[float]:
    """Full-jitter exponential back-off: uniform(0.5, 1) x min(cap, base x 2^n)."""
    r = rng or random.Random()
    n = 0
    while True:
        yield min(cap, base * (2 ** n)) * r.uniform(0.5, 1.0)
        n = min(n + 1, 16)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttOptions:
    broker: Broker
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    version: str = "auto"  # auto (5, falling back to 3.1.1 on the first attempts) | 5 | 3.1.1
    persistent: bool = False  # keep the session (and what the broker queues for it) across disconnects
    session_expiry_s: int = 7 * 24 * 3600
    will: Will | None = None
    keepalive: int = 30
    connack_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    reconnect_base_s: float = 1.0
    reconnect_max_s: float = 60.0
    inflight_max: int = 1000
    manual_ack: bool = False

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"mqtt_version: {self.version!r} must be auto, 5 or 3.1.1")
        if not self.client_id:
            raise ValueError("MQTT client id must not be empty")


@dataclass
class Handlers:
    """What the owner of a Connector hears. All run on the network thread, without the paho lock."""

    on_connect: Callable[[bool], None] | None = None  # session_present
    on_disconnect: Callable[[str], None] | None = None  # reason
    on_message: Callable[[mqtt.MQTTMessage, int], None] | None = None  # message, connection generation
    on_publish: Callable[[int], None] | None = None  # mid acknowledged by the broker
    on_idle: Callable[[], object] | None = None  # every turn of the loop while connected
    may_read: Callable[[], bool] | None = None  # False: leave incoming data in the socket (back-pressure)


ClientFactory = Callable[..., Any]  # paho.mqtt.client.Client or a stand-in with the same methods


class BufferedClient(mqtt.Client):
    """paho's client, reading its socket up to 64 KiB at a time.

    paho asks the socket for each packet's bytes a few at a time (its type, its length, its body): a
    system call each. This serves those reads from one buffer, filled by one ``recv``, so a burst of
    small messages costs one system call instead of three per message. ``buffered()`` says whether
    bytes wait in the buffer (the connection's loop reads those before it waits on the socket again)."""

    _rbuf = b""
    _rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            buf, pos = super()._sock_recv(65536), 0  # raises as paho's does (would block, closed...)
            if not buf:
                return buf
        out = buf[pos:pos + bufsize]
        self._rbuf, self._rpos = buf, pos + len(out)
        return out

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0  # never carry bytes of one connection into the next
        super()._sock_close()

    def buffered(self) -> bool:
        return self._rpos < len(self._rbuf)


class Connector:
    def __init__(self, opts: MqttOptions, handlers: Handlers | None = None,
                 client_factory: ClientFactory | None = None) -> None:
        self.opts = opts
        self.h = handlers or Handlers()
        self._factory: ClientFactory = client_factory or BufferedClient
        self._io = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: list[tuple[str, Any]] = []
        self._may_fall_back = opts.version == "auto"
        self.protocol = mqtt.MQTTv311 if opts.version == "3.1.1" else mqtt.MQTTv5
        self.connected = threading.Event()
        self.ever_connected = False
        self.generation = 0  # successful connections so far
        self.clients_made = 0
        self.connects = 0
        self.disconnects = 0
        self.taken_over = 0  # disconnects because another connection used this client id (MQTT 5)
        self.last_taken_over: float | None = None  # monotonic
        self.short_lived = 0  # connections in a row the broker ended within SHORT_LIVED_S
        self._up_at = 0.0  # when the current connection came up (monotonic)
        self.last_error: str | None = None
        self.down_since: float | None = time.monotonic()  # not connected since (monotonic); None when connected
        self._refused: int | None = None  # reason code of a refused CONNACK in this attempt
        self._answered = False  # a CONNACK came in this attempt
        self.client = self._make_client()

    # ------------------------------------------------------------------ client
    @property
    def protocol_name(self) -> str:
        return "5" if self.protocol == mqtt.MQTTv5 else "3.1.1"

    def _make_client(self) -> Any:
        o = self.opts
        kwargs: dict[str, Any] = {"client_id": o.client_id, "protocol": self.protocol}
        if self.protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = not o.persistent
        c = self._factory(CallbackAPIVersion.VERSION2, **kwargs)
        self.clients_made += 1
        if o.will is not None:
            c.will_set(o.will.topic, o.will.payload, qos=o.will.qos, retain=o.will.retain)
        if o.broker.tls:
            c.tls_set(ca_certs=o.ca_file, certfile=o.cert_file, keyfile=o.key_file, cert_reqs=ssl.CERT_REQUIRED)
            c.tls_insecure_set(False)
        username = o.username or o.broker.username
        if username:
            c.username_pw_set(username, o.password or o.broker.password)
        c.max_inflight_messages_set(max(1, min(o.inflight_max, MAX_INFLIGHT)))
        c.max_queued_messages_set(0)
        c.manual_ack_set(o.manual_ack)
        c.connect_timeout = o.connect_timeout_s
        c.on_connect = self._paho_connect
        c.on_disconnect = self._paho_disconnect
        c.on_message = self._paho_message
        c.on_publish = self._paho_publish
        return c

    # paho's callbacks run inside loop_read/loop_write/loop_misc, under self._io: record only.
    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if client is not self.client:
            return
        self._answered = True
        if reason_code.is_failure:
            self._refused = int(reason_code.value)
            self.last_error = f"broker refused the connection: {reason_code}"
            self._events.append(("refused", self.last_error))
            return
        self.generation += 1
        self.connects += 1
        self._up_at = time.monotonic()
        self.ever_connected = True
        self.last_error = None
        self.down_since = None
        self.connected.set()
        self._events.append(("connect", bool(flags.session_present)))

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if client is not self.client or not self.connected.is_set():
            return
        self.connected.clear()
        self.disconnects += 1
        self.down_since = time.monotonic()
        why = str(reason_code)
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            self.taken_over += 1
            self.last_taken_over = time.monotonic()
            why = (f"{why}: another connection used client id {self.opts.client_id!r} "
                   "(two processes with one id, or an account allowed to take it)")
        if not self._stop.is_set():
            self.last_error = f"lost the broker: {why}"
        self._events.append(("disconnect", why))

    def _paho_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if client is self.client:
            self._events.append(("message", (msg, self.generation)))

    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if client is self.client:
            self._events.append(("publish", mid))

    def _dispatch(self) -> None:
        with self._io:
            events, self._events = self._events, []
        for kind, arg in events:
            fn: Callable[..., None] | None = {
                "connect": self.h.on_connect, "disconnect": self.h.on_disconnect,
                "publish": self.h.on_publish, "refused": None, "message": self.h.on_message}[kind]
            if fn is None:
                if kind == "refused":
                    log.warning("%s", arg)
                continue
            try:
                fn(*arg) if kind == "message" else fn(arg)
            except Exception:
                log.exception("MQTT %s handler failed", kind)

    # ------------------------------------------------------------------ calls from any thread
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Hand a message to paho; None when not connected."""
        if not self.connected.is_set():
            return None
        with self._io:
            if not self.connected.is_set():
                return None
            info: mqtt.MQTTMessageInfo = self.client.publish(topic, payload, qos=qos, retain=retain)
            return info

    def ack(self, mid: int, qos: int, generation: int) -> bool:
        """Acknowledge a message on the connection that delivered it. False when that connection is
        gone: the broker re-sends the message on the new one, and that copy is acknowledged."""
        if qos <= 0:
            return True
        with self._io:
            if generation != self.generation or not self.connected.is_set():
                return False
            return bool(self.client.ack(mid, qos) == mqtt.MQTT_ERR_SUCCESS)

    def subscribe(self, topic: str, qos: int = 1) -> bool:
        with self._io:
            rc, _ = self.client.subscribe(topic, qos=qos)
            return bool(rc == mqtt.MQTT_ERR_SUCCESS)

    # ------------------------------------------------------------------ the network thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.opts.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _may_read(self) -> bool:
        return self.h.may_read is None or bool(self.h.may_read())

    def _connect(self) -> None:
        o = self.opts
        kwargs: dict[str, Any] = {}
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = not o.persistent
            if o.persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = o.session_expiry_s
                kwargs["properties"] = props
        with self._io:
            self._refused = None
            self._answered = False
            self.client.connect(o.broker.host, o.broker.port, keepalive=o.keepalive, **kwargs)

    def _run(self) -> None:
        delays = backoff_delays(self.opts.reconnect_max_s, self.opts.reconnect_base_s)
        while not self._stop.is_set():
            if self.ever_connected and not self._may_read():
                self._stop.wait(0.2)  # the owner has a backlog: the broker keeps the rest meanwhile
                continue
            try:
                self._connect()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"cannot reach broker {self.opts.broker.host}:{self.opts.broker.port}: {exc}"
                log.warning("%s", self.last_error)
                self._stop.wait(next(delays))
                continue
            except Exception as exc:  # never let the network thread die
                self.last_error = f"connecting failed: {type(exc).__name__}: {exc}"
                log.exception("connecting to the broker failed")
                self._stop.wait(next(delays))
                continue
            generation = self.generation
            outcome = self._serve()
            self._dispatch()
            if self.generation != generation:
                if outcome == "lost" and time.monotonic() - self._up_at < SHORT_LIVED_S:
                    self._short_lived()  # the back-off goes on growing: two clients would take turns for ever
                else:
                    self.short_lived = 0
                    delays = backoff_delays(self.opts.reconnect_max_s, self.opts.reconnect_base_s)
            if outcome == "stopped":
                break
            if self._should_fall_back(outcome):
                self._fall_back()
                continue
            self._stop.wait(next(delays))
        self._close()

    def _short_lived(self) -> None:
        self.short_lived += 1
        if self.short_lived == SHORT_LIVED_WARN:
            b = self.opts.broker
            self.last_error = (f"broker {b.host}:{b.port} ended {SHORT_LIVED_WARN} connections in a row within "
                               f"{SHORT_LIVED_S:g} s of their start: is another client using client id "
                               f"{self.opts.client_id!r} (two agents with one agent_id, or a process left running)?")
            log.warning("%s", self.last_error)

    def _should_fall_back(self, outcome: str) -> bool:
        if not self._may_fall_back or self.ever_connected or self.protocol != mqtt.MQTTv5:
            return False
        return outcome == "no_connack" or (outcome == "refused" and self._refused in UNSUPPORTED_PROTOCOL)

    def _fall_back(self) -> None:
        """Before anything has connected: the broker does not speak MQTT 5; from now on 3.1.1."""
        log.info("broker %s:%s does not speak MQTT 5; %s uses 3.1.1", self.opts.broker.host,
                 self.opts.broker.port, self.opts.client_id)
        with self._io:
            old = self.client
            self._drop(old)
            self.protocol = mqtt.MQTTv311
            self._may_fall_back = False
            self.client = self._make_client()

    def _drop(self, client: Any) -> None:
        try:
            client.disconnect()
            client.loop_write()
        except Exception as exc:
            log.debug("dropping a connection: %s", exc)
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _serve(self) -> str:
        """Run one connection until it ends: stopped | lost | refused | no_connack."""
        started = time.monotonic()
        c = self.client
        while True:
            if self._stop.is_set():
                return "stopped"
            sock = c.socket()
            if sock is None:
                return "refused" if self._refused is not None else "lost"
            connected = self.connected.is_set()
            read = not connected or self._may_read()
            buffered = getattr(c, "buffered", None)
            pending = read and ((hasattr(sock, "pending") and sock.pending() > 0) or (buffered is not None
                                                                                      and buffered()))
            try:
                r, w, _ = select.select([sock] if read else [], [sock] if c.want_write() else [], [],
                                        0.0 if pending else 0.05)
            except (OSError, ValueError, TypeError):
                r, w = [], []
            with self._io:
                rc = mqtt.MQTT_ERR_SUCCESS
                if read and (r or pending):
                    rc = c.loop_read()
                    burst = 0  # the packets already in the buffer, up to a bound, before writing acks
                    while rc == mqtt.MQTT_ERR_SUCCESS and buffered is not None and burst < 256 and buffered():
                        rc = c.loop_read()
                        burst += 1
                if rc == mqtt.MQTT_ERR_SUCCESS and (w or c.want_write()):
                    rc = c.loop_write()
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    rc = c.loop_misc()
            self._dispatch()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if self.connected.is_set():  # paho closed the socket without telling on_disconnect
                    self._paho_disconnect(c, None, None, f"network error {rc}", None)
                    self._dispatch()
                elif not self._answered and self._refused is None:  # closed before any CONNACK: say so
                    b = self.opts.broker
                    self.last_error = (f"broker {b.host}:{b.port} closed the connection before answering the MQTT "
                                       f"CONNECT ({mqtt.error_string(rc)}): "
                                       + ("is it a plain listener? (mqtts:// speaks TLS)" if b.tls else
                                          "is it a TLS listener? use mqtts://"))
                    log.warning("%s", self.last_error)
                return "refused" if self._refused is not None else "lost"
            if not self._answered:
                if time.monotonic() - started > self.opts.connack_timeout_s:
                    self.last_error = (f"broker {self.opts.broker.host}:{self.opts.broker.port} did not answer "
                                       f"an MQTT {self.protocol_name} CONNECT within {self.opts.connack_timeout_s:g} s")
                    log.warning("%s", self.last_error)
                    with self._io:
                        self._drop(c)
                    return "no_connack"
            elif not self.connected.is_set():
                return "lost"
            elif self.h.on_idle is not None:
                try:
                    self.h.on_idle()
                except Exception:
                    log.exception("MQTT idle handler failed")

    def _close(self) -> None:
        with self._io:
            was = self.connected.is_set()
            self.connected.clear()
            try:
                if was:
                    self.client.disconnect()
                    end = time.monotonic() + 1.0
                    while self.client.want_write() and self.client.socket() is not None and time.monotonic() < end:
                        self.client.loop_write()
                        time.sleep(0.01)
            except Exception as exc:
                log.debug("disconnect: %s", exc)
            self._drop(self.client)
        self._events.clear()
        if self.down_since is None:
            self.down_since = time.monotonic()
