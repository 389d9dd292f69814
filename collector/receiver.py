"""An MQTT receiver process: one member of the collector's shared subscription.

It takes its share of the stream off the wire, validates every message (``decode_message``, the one
validation there is) and hands batches to the collector's single writer over a pipe: each message as
received, marked checked, or with the exact reason it was refused. It acknowledges a batch to the
broker only when the writer says that batch is committed (ack after commit, on the connection that
delivered it), and stops reading from the socket while too many messages wait for that (the broker
keeps the rest). It stores nothing and decides nothing: receiving and validating are what scale with
processes, the writer's SQL does not (``collector/writer.py`` is the other side).
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from collector.ingestor import Facts, telemetry_facts
from collector.timeline import is_dashboard_boot
from common.config import parse_broker
from common.mqtt import Connector, Handlers, MqttOptions
from common.protocol import KIND_OF_CHANNEL, ProtocolError, decode_message, subscription_for

log = logging.getLogger(__name__)

BATCH = 500  # messages per hand-off
LINGER_S = 0.01  # a partial batch waits at most this long
MAX_UNACKED = 5_000  # messages handed off and not yet committed: past this, stop reading (memory stays flat)


def receiver_version(configured: str) -> str:
    """MQTT 3.1.1 unless 5 is asked for: paho spends about twice the processor per message on MQTT 5
    (its properties), measured here, and a receiver needs nothing of 5. Mosquitto (and the other brokers
    Pantau documents) serve shared subscriptions to 3.1.1 clients too."""
    return "5" if configured == "5" else "3.1.1"


class _Pipe:
    """The process's pipe to the writer, shared by its receivers: one sender at a time, batch ids unique in
    the process, and one reader handing each commit to the receiver that sent the batch."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.next_id = 0
        self.owners: dict[int, Receiver] = {}
        self.members: list[Receiver] = []  # every receiver of this process, idle or not
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, owner: Receiver | None, items: list[Any]) -> int:
        with self.lock:
            self.next_id += 1
            if owner is not None:
                self.owners[self.next_id] = owner
            self.conn.send_bytes(pickle.dumps((self.next_id, items), protocol=pickle.HIGHEST_PROTOCOL))
            return self.next_id

    def status(self, body: dict[str, Any]) -> None:
        with self.lock:
            self.conn.send_bytes(pickle.dumps(("status", body)))

    def _read(self) -> None:
        while True:
            try:
                batch_id = self.conn.recv()
            except (EOFError, OSError):
                # the writer is gone (killed, even -9): every receiver of this process stops, idle ones too —
                # left running they would take the restarted collector's client ids from it, again and again.
                # What is unacknowledged comes back on the next session.
                self.closed.set()
                for r in self.members:  # (every receiver of the process, so every owner of a batch)
                    r._stop.set()
                return
            with self.lock:
                owner = self.owners.pop(batch_id, None)
            if owner is not None:
                owner._committed(batch_id)


class Receiver:
    def __init__(self, cfg: Any, index: int, pipe: _Pipe, drain: str | None = None) -> None:
        """``drain``: instead of receiving, empty the session of client id ``<client_id>-<drain>`` (``""``: the
        in-process subscriber's own ``<client_id>``, left by ``receivers = 0``) that an
        earlier configuration left (more receivers then, or worker processes) and end it."""
        self.pipe = pipe
        self.index = index
        self.drain = drain
        self.prefix = cfg.prefix
        broker = parse_broker(cfg.broker)
        user = cfg.username or broker.username
        # Telemetry (most of the stream) is split between the receivers by a shared subscription. Evidence
        # channels are not: Mosquitto 2.0 does not restore shared subscriptions from its persistence file,
        # so what is published after a broker restart, before the receivers subscribe again, would be lost.
        # Receiver 0 takes them on plain subscriptions of its persistent session, which the broker restores
        # and queues for (measured: docs/scaling.md). A telemetry message lost in that window is followed
        # by the next one within its interval.
        base = subscription_for(cfg.prefix)[: -len("+")]
        group = cfg.share_group or "pantau-ingest"
        self.topics = [f"$share/{group}/{base}telemetry"]
        if index == 0:
            self.topics += [base + ch for ch in sorted(KIND_OF_CHANNEL) if ch != "telemetry"]
        suffix = f"r{index}" if drain is None else drain
        if drain is not None:
            self.topics = []  # the session's subscriptions are the broker's
        self.last_message = time.monotonic()
        self._lock = threading.Lock()
        self._items: list[tuple[str, bytes, float, tuple[str, str] | None, Facts | None, bool]] = []
        self._acks: list[tuple[int, int, int]] = []
        self._first = 0.0
        self._inflight: dict[int, list[tuple[int, int, int]]] = {}
        self._unacked = 0
        self._stop = threading.Event()
        pipe.members.append(self)
        if pipe.closed.is_set():  # the writer went before this receiver was made
            self._stop.set()
        # each receiver is its own broker account (<username>-r<index>, same password): the shipped broker
        # ties the client id to the account, so receivers sharing one would take each other's connection
        self.mqtt = Connector(
            MqttOptions(broker=broker, client_id=f"{cfg.client_id}-{suffix}" if suffix else cfg.client_id,
                        username=(f"{user}-{suffix}" if suffix else user) if user else None,
                        password=cfg.password or broker.password, ca_file=cfg.ca_file,
                        version="5" if drain is not None else receiver_version(cfg.mqtt_version),
                        persistent=True, session_expiry_s=0 if drain is not None else 7 * 24 * 3600, manual_ack=True,
                        reconnect_max_s=30.0),
            Handlers(on_connect=self._on_connect, on_disconnect=self._on_disconnect, on_message=self._on_message,
                     may_read=self._may_read))

    def _on_connect(self, session_present: bool) -> None:
        if self.drain is not None:  # resumed with expiry 0: what it holds is delivered now, and the session ends after
            if session_present:
                log.warning("draining the broker session of %s, left by an earlier configuration (it would take "
                            "a share of the stream that nobody stores)", self.mqtt.opts.client_id)
                self.drained = True
            else:
                self._stop.set()
            return
        for topic in self.topics:
            self.mqtt.subscribe(topic, qos=1)
        # "subscribed" only once every channel has a receiver (receiver 0's): what waits for it may publish
        log.info("%s %s on %s:%s (MQTT %s, session %s)", "subscribed to" if self.index == 0 else "joined",
                 ", ".join(self.topics), self.mqtt.opts.broker.host, self.mqtt.opts.broker.port,
                 self.mqtt.protocol_name, "resumed" if session_present else "new")
        self._status()

    def _on_disconnect(self, reason: str) -> None:
        if not self._stop.is_set():
            log.warning("receiver lost the broker (%s); reconnecting", reason)
        self._status()

    def _status(self) -> None:
        """Tell the writer how the connection stands (its health names a broker that is away)."""
        if self.drain is not None:
            return
        with self._lock:
            self.pipe.status({
                "connected": self.mqtt.connected.is_set(), "down_since_s": (
                    None if self.mqtt.down_since is None else time.monotonic() - self.mqtt.down_since),
                "last_error": self.mqtt.last_error, "protocol": self.mqtt.protocol_name,
                "taken_over": self.mqtt.taken_over, "disconnects": self.mqtt.disconnects})

    def _may_read(self) -> bool:
        return not self._stop.is_set() and self._unacked < MAX_UNACKED

    def _on_message(self, msg: Any, generation: int) -> None:
        rx = time.time()
        self.last_message = time.monotonic()
        topic, payload = msg.topic, bytes(msg.payload)
        why: tuple[str, str] | None = None
        facts: Facts | None = None
        try:
            m = decode_message(topic, payload, self.prefix)
            if is_dashboard_boot(m.boot):
                why = ("bad_boot", "dashboard reports are made by the collector, never sent over MQTT")
            elif m.kind == "telemetry":
                facts = telemetry_facts(m.payload)  # the rows it makes, read here rather than by the writer
        except ProtocolError as exc:
            why = (exc.reason, exc.detail)
        with self._lock:
            if not self._items:
                self._first = time.monotonic()
            self._items.append((topic, payload, rx, why, facts, bool(msg.retain)))
            self._acks.append((msg.mid, msg.qos, generation))
            if len(self._items) >= BATCH:
                self._flush()

    def _flush(self) -> None:
        """Hand the batch in hand to the writer (under ``_lock``)."""
        if not self._items:
            return
        batch_id = self.pipe.send(self, self._items)
        self._inflight[batch_id] = self._acks
        self._unacked += len(self._acks)
        self._items, self._acks = [], []

    def _linger(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(LINGER_S):
            with self._lock:
                if self._items and time.monotonic() - self._first >= LINGER_S:
                    self._flush()
            if time.monotonic() - last_status >= 5.0:
                last_status = time.monotonic()
                self._status()

    def _committed(self, batch_id: int) -> None:
        """The writer committed this batch: acknowledge its messages to the broker."""
        with self._lock:
            acks = self._inflight.pop(batch_id, [])
            self._unacked -= len(acks)
        for mid, qos, generation in acks:
            self.mqtt.ack(mid, qos, generation)

    def run(self) -> None:
        if self._stop.is_set():  # the writer went before this receiver ran: never take the client id
            return
        threading.Thread(target=self._linger, daemon=True).start()
        self.mqtt.start()
        if self.drain is not None:
            self._run_drain()
        else:
            self._stop.wait()
        self.mqtt.stop()

    drained = False

    def _run_drain(self) -> None:
        """Until what the session held is stored and acknowledged (or there was no session to drain)."""
        started = time.monotonic()
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if not self.mqtt.ever_connected and (self.mqtt.last_error or now - started > 10):
                return  # no such account (refused), or no broker: nothing this collector could drain
            with self._lock:
                idle = not self._items and not self._unacked
            if self.mqtt.connected.is_set() and idle and now - self.last_message > 1.5:
                return


def main(config: Any, index: int, conn: Connection) -> None:
    """Entry point of a receiver process (started by ``collector.writer.Writer``)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s receiver{index} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the collector stops its receivers itself (SIGTERM)
    r = Receiver(config, index, _Pipe(conn))
    signal.signal(signal.SIGTERM, lambda *_: r._stop.set())
    from collector.service import settle_heap

    settle_heap()  # a receiver's start-up heap stays out of its full collections (see settle_heap)
    r.run()


def drain_main(config: Any, suffixes: list[str], conn: Connection) -> None:
    """Entry point of the process that drains sessions an earlier configuration left (``Receiver`` drain)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s drain %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = _Pipe(conn)
    for noisy in ("common.mqtt",):  # an id without an account is refused: expected here, not a warning
        logging.getLogger(noisy).setLevel(logging.ERROR)
    drains = [Receiver(config, -1, pipe, drain=s) for s in suffixes]
    threads = [threading.Thread(target=d.run, daemon=True) for d in drains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
