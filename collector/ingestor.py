"""The ingestor: validate, deduplicate and store. It judges nothing.

Transport-free: the MQTT subscriber, ingest workers, replay-through-the-live-path tests and the
benchmarks all feed ``Ingestor.ingest``. One batch is one transaction and each message is applied
in a savepoint of its own, so a message that breaks anything is dead-lettered with the exception's
class and the batch goes on. The subscriber acknowledges a message to the broker only after the
batch holding it is committed (``synchronous=FULL``: durable before acknowledged).

What it stores as evidence is what the classifier reads (``Classifier.accept`` in this process,
``Classifier.follow`` from the store in another). Each agent's clock (its greatest ``ts``) and clock
offset (the smallest receive time minus ``ts`` over the last 10 minutes) are kept here, per agent.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from collector.store import store_failure
from collector.store.shared import DEVICE_METRICS, HOST_METRICS
from collector.store.sqlite import SqliteStore, dumps
from collector.timeline import WILL_SEQ, AgentClocks, is_dashboard_boot
from common.protocol import (
    DASHBOARD_BOOT_PREFIX,
    DEFAULT_PREFIX,
    SPEED_RANK,
    DeviceObject,
    HostGauges,
    Message,
    Payload,
    ProtocolError,
    Topic,
    decode_message,
    format_epoch,
    parse_topic,
    ts_seconds,
)

log = logging.getLogger(__name__)
OFFSET_WINDOW_S = 600.0
MISMATCH = "registry_mismatch"


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    received_at: float  # wall clock, seconds
    stamp: str | None = None  # a capture's received_at (kept; no rule reads it)
    from_broker: bool = False  # arrived over MQTT (where no dashboard report can come from)
    # validated already by a receiver process (collector/receiver.py): refused with (reason, detail), or
    # checked (its payload is parsed again without repeating the checks)
    refused: tuple[str, str] | None = None
    checked: bool = False
    facts: Facts | None = None  # a checked telemetry message, read already (``telemetry_facts``)
    retained: bool = False  # the broker's retained copy, delivered again at every subscription


@dataclass(slots=True)
class Stored:
    """One piece of evidence as committed: what the classifier is fed."""

    id: int
    msg: Message
    stamp: str
    flag: str | None = None


def _num(v: Any) -> float | None:
    c = v.__class__
    return v if c is float else float(v) if c is int else None  # validated: a number or null


def _flag(v: Any) -> int | None:
    return (1 if v else 0) if isinstance(v, bool) else None


# What a telemetry message says, in the form its rows are written in: (agent, boot, seq, ts, its seconds,
# the host gauges in HOST_METRICS order, each device's (key, present, in_use, errors_total, resets_total,
# speed rank), the keys it lists present). Receiver processes compute it, so the writer does not.
Facts = tuple[str, str, int, str, float, tuple[float | None, ...],
              tuple[tuple[str, int | None, int | None, float | None, float | None, int | None], ...], frozenset[str]]


def telemetry_facts(p: Payload) -> Facts:
    """The facts of a validated telemetry payload."""
    host = p.get("host") or HostGauges()
    devs = p["devices"]
    return (p["agent"], p["boot"], p["seq"], p["ts"], ts_seconds(p["ts"]),
            tuple([_num(host.get(k)) for k in HOST_METRICS]),
            tuple([(d["key"], _flag(d.get("present")), _flag(d.get("in_use")), _num(d.get("errors_total")),
                    _num(d.get("resets_total")), SPEED_RANK.get(d.get("speed") or "")) for d in devs]),
            frozenset([d["key"] for d in devs if d.get("present") is True]))


def _checked(item: Inbound, prefix: str | None) -> Message:
    """A message a receiver process validated: parsed again (orjson), not checked again."""
    return Message(parse_topic(item.topic, prefix), orjson.loads(item.payload))


_RAW = "\0raw"  # in a batch's agent update: the payload of its last plain telemetry, read at the end


class _OffsetWindow:
    """Sliding minimum of (receive time - ts) over the last ``OFFSET_WINDOW_S`` of receive time."""

    __slots__ = ("q",)

    def __init__(self) -> None:
        self.q: deque[tuple[float, float]] = deque()

    def add(self, rx: float, offset: float) -> float:
        q = self.q
        while q and q[-1][1] >= offset:
            q.pop()
        q.append((rx, offset))
        while q[0][0] < rx - OFFSET_WINDOW_S:
            q.popleft()
        return q[0][1]


@dataclass
class _Batch:
    """What one batch changes, merged into the ingestor only after it commits."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    host_rows: list[tuple[Any, ...]] = field(default_factory=list)
    device_rows: list[tuple[Any, ...]] = field(default_factory=list)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    evidence: list[Stored] = field(default_factory=list)
    clocks: dict[str, tuple[float, str]] = field(default_factory=dict)
    offsets: list[tuple[str, float, float]] = field(default_factory=list)  # (agent, received, received - ts)
    offset_min: dict[str, float] = field(default_factory=dict)
    boot_ts: dict[tuple[str, str], float] = field(default_factory=dict)  # (agent, boot) -> latest ts in batch
    tele: dict[str, tuple[frozenset[str], bool]] = field(default_factory=dict)  # (last present set, events since)
    lag: float = 0.0

    def mark(self, agent: str) -> tuple[Any, ...]:
        """What one message may change (all of it keyed by its agent), to undo if it fails."""
        upd = self.agents.get(agent)
        return (len(self.host_rows), len(self.device_rows), len(self.evidence), len(self.offsets), self.stored,
                self.duplicates, self.lag, None if upd is None else dict(upd), self.clocks.get(agent),
                self.tele.get(agent))

    def undo(self, agent: str, m: tuple[Any, ...]) -> None:
        del self.host_rows[m[0]:], self.device_rows[m[1]:], self.evidence[m[2]:], self.offsets[m[3]:]
        self.stored, self.duplicates, self.lag = m[4], m[5], m[6]
        for table, old in ((self.agents, m[7]), (self.clocks, m[8]), (self.tele, m[9])):
            if old is None:
                table.pop(agent, None)
            else:
                table[agent] = old


class Ingestor:
    def __init__(self, store: SqliteStore, prefix: str | None = None, dead_letter_max: int = 1000,
                 timeseries: Any = None) -> None:
        self.store = store
        self.prefix = prefix
        self.dead_letter_max = dead_letter_max
        self.timeseries = timeseries  # an optional second sink (InfluxDB)
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.last_lag = 0.0
        self.clocks = AgentClocks()
        self._offsets: dict[str, _OffsetWindow] = {}
        # agent -> (present set of its last telemetry evidence, whether other evidence came since)
        self._tele: dict[str, tuple[frozenset[str], bool]] = {}
        self._log_gate: dict[str, float] = {}
        # called after each commit with the evidence stored, the agents' clocks and boots' latest ts it moved
        self.listeners: list[Callable[[list[Stored], dict[str, float], dict[tuple[str, str], float]], None]] = []
        self.last_commit = time.time()
        self.last_failure: str | None = None  # why the last batch could not be stored, until one is
        for r in store.query("SELECT agent, clock FROM agents WHERE clock IS NOT NULL"):
            try:
                self.clocks.advance(r["agent"], r["clock"])
            except ProtocolError:
                log.warning("agent %s: stored clock %r is not a time; it starts afresh", r["agent"], r["clock"])

    # ------------------------------------------------------------------ the batch
    def ingest(self, items: list[Inbound]) -> list[Stored]:
        """Validate, dedup and store one batch in one transaction; returns the evidence stored.

        Raises only when the store itself fails (full disk, I/O): then nothing of the batch is
        kept and the caller retries it. Anything else a message breaks dead-letters that message."""
        try:
            batch = self._ingest(items)
        except Exception as exc:
            self.last_failure = f"{type(exc).__name__}: {exc}"
            if store_failure(exc) or len(items) == 1:
                raise
            log.exception("a batch of %d failed outside any one message; storing them one by one", len(items))
            out: list[Stored] = []
            for item in items:
                out += self.ingest([item])
            return out
        self._merge(batch)
        for fn in self.listeners:
            fn(batch.evidence, {a: t for a, (t, _) in batch.clocks.items()}, batch.boot_ts)
        return batch.evidence

    def _ingest(self, items: list[Inbound]) -> _Batch:
        b = _Batch()
        with self.store.tx() as db:
            good: list[tuple[Inbound, Message | None]] = []
            keys: list[tuple[str, str, int]] = []
            for item in items:
                b.received += 1
                f = item.facts
                if f is not None:  # checked telemetry, read by its receiver
                    good.append((item, None))
                    keys.append((f[0], f[1], f[2]))
                    continue
                try:
                    if item.refused is not None:
                        raise ProtocolError(*item.refused)
                    msg = _checked(item, self.prefix) if item.checked else decode_message(item.topic, item.payload,
                                                                                            self.prefix)
                    if item.from_broker and is_dashboard_boot(msg.boot):
                        raise ProtocolError("bad_boot", "dashboard reports are made by the collector, never sent "
                                                        "over MQTT")
                except ProtocolError as exc:
                    self._reject(db, b, item, exc)
                    continue
                good.append((item, msg))
                keys.append((msg.agent, msg.boot, WILL_SEQ if msg.seq is None else msg.seq))
            # deduplication for the whole batch at once (a will is its boot's seq -1)
            new = self.store.mark_seen_many(db, keys)
            for (item, m), first in zip(good, new, strict=True):
                if not first:
                    b.duplicates += 1
                    continue
                f = item.facts
                if m is None and f is not None:
                    last, events_since = self._tele_state(b, f[0])
                    if not f[7] or (f[7] == last and not events_since):
                        self._plain(db, b, item, f)  # telemetry that is no evidence: rows and bookkeeping only
                        continue
                msg = m if m is not None else _checked(item, self.prefix)  # (a device seen again: evidence)
                undo = b.mark(msg.agent)
                seen_again = self._seen_again(b, msg) if msg.kind == "telemetry" else None
                plain = msg.kind == "telemetry" and seen_again is None
                try:
                    if plain:  # samples written with the batch: nothing of it in the database yet
                        self._apply(db, b, item, msg, seen_again)
                    else:
                        with self.store.savepoint(db):
                            self._apply(db, b, item, msg, seen_again)
                except Exception as exc:
                    if store_failure(exc):
                        raise
                    b.undo(msg.agent, undo)
                    self.store.unmark_seen(db, msg.agent, msg.boot, WILL_SEQ if msg.seq is None else msg.seq)
                    log.exception("message on %s broke ingest; dead-lettered", item.topic[:120])
                    self._reject(db, b, item, ProtocolError("ingest_failed", f"{type(exc).__name__}: {exc}"))
            self.store.add_samples(db, b.host_rows, b.device_rows)
            for agent, rx, off in b.offsets:  # (an observation of what arrived: kept even if this batch fails)
                b.offset_min[agent] = self._offsets.setdefault(agent, _OffsetWindow()).add(rx, off)
            for agent, upd in b.agents.items():
                self._update_agent(db, agent, upd, b)
            db.executemany("UPDATE boots SET last_ts = ? WHERE agent = ? AND boot = ? "
                           "AND (last_ts IS NULL OR last_ts < ?)",
                           [(t, a, boot, t) for (a, boot), t in b.boot_ts.items()])
            dead = db.execute("SELECT max(id) FROM dead_letter").fetchone()[0]
            if dead and dead > self.dead_letter_max:
                db.execute("DELETE FROM dead_letter WHERE id <= ?", (dead - self.dead_letter_max,))
            self._persist_counters(db, b)
        return b

    def _apply(self, db: sqlite3.Connection, b: _Batch, item: Inbound, msg: Message,
               seen_again: frozenset[str] | None = None) -> None:
        """Store one message seen for the first time (its changes to ``b`` are undone by the caller if this
        raises)."""
        dashboard = is_dashboard_boot(msg.boot)
        clock = self._clock(b, msg.agent)
        # a will takes its agent's clock as it stands (its receive time if the agent has none yet)
        stamp = msg.ts if msg.ts is not None else clock[1] if clock else format_epoch(item.received_at)
        t = ts_seconds(stamp)
        if dashboard:  # placed by its ts, it moves no clock and is no sign of the PC
            upd = b.agents.setdefault(msg.agent, {})
        elif msg.ts is None:  # a will: nothing it says dates anything
            upd = self._seen(b, msg.agent, stamp)
        else:
            upd = self._observe(b, msg.agent, msg.boot, stamp, t, item.received_at, clock)
        if msg.kind == "telemetry":
            self._telemetry(db, b, msg, stamp, item.received_at, upd, seen_again)
        else:
            self._evidence(db, b, msg, stamp, item.received_at)
            last, _ = self._tele_state(b, msg.agent)
            b.tele[msg.agent] = (last, True)  # evidence came: the next telemetry is evidence again
            if msg.kind == "state":
                p = msg.payload
                upd.update(state=p["state"], reason=p.get("reason"), boot=msg.boot)
                for k in ("hostname", "version", "platform"):
                    if p.get(k) is not None:
                        upd[k] = p[k]
                if isinstance(p.get("labels"), dict):
                    upd["labels"] = dumps(self._trusted_labels(db, msg.agent, p["labels"]))
            elif msg.kind == "inventory":
                upd["inventory"] = dumps(msg.payload["devices"])
        b.stored += 1

    def _plain(self, db: sqlite3.Connection, b: _Batch, item: Inbound, f: Facts) -> None:
        """Telemetry that is no evidence, from its facts: what ``_apply`` and ``_telemetry`` do for it."""
        agent, boot, _, stamp, t, _, _, _ = f
        upd = self._observe(b, agent, boot, stamp, t, item.received_at, self._clock(b, agent))
        self._samples(db, b, f, item.received_at)
        upd.pop("host", None)
        upd.pop("devices", None)
        upd[_RAW] = item.payload  # its host and devices are read once per batch, for the last one only
        b.stored += 1

    def _clock(self, b: _Batch, agent: str) -> tuple[float, str] | None:
        """An agent's clock as this batch has moved it: (seconds, its ts)."""
        clock = b.clocks.get(agent)
        if clock is None and agent in self.clocks.t:
            clock = (self.clocks.t[agent], self.clocks.ts[agent])
        return clock

    @staticmethod
    def _seen(b: _Batch, agent: str, stamp: str) -> dict[str, Any]:
        """The batch's update of an agent, with when it was last heard of."""
        upd = b.agents.setdefault(agent, {})
        if upd.get("last_seen") is None or stamp > upd["last_seen"]:
            upd["last_seen"] = stamp
        return upd

    def _observe(self, b: _Batch, agent: str, boot: str, stamp: str, t: float, rx: float,
                 clock: tuple[float, str] | None) -> dict[str, Any]:
        """A message dated by its agent: its clock, its boot's latest ts, its clock offset and lag move.
        Returns the batch's update of the agent."""
        if clock is None or t > clock[0]:
            b.clocks[agent] = (t, stamp)
        ident = (agent, boot)
        if t > b.boot_ts.get(ident, float("-inf")):
            b.boot_ts[ident] = t  # (not undone with a failed message: an observation of what arrived)
        b.offsets.append((agent, rx, rx - t))
        b.lag = max(0.0, rx - t)
        return self._seen(b, agent, stamp)

    def _samples(self, db: sqlite3.Connection, b: _Batch, f: Facts, rx: float) -> None:
        """A telemetry message's sample rows (and its points for the time-series sink)."""
        agent, _, _, _, t, host_values, devices, _ = f
        b.host_rows.append((t, agent, *host_values, rx))
        b.device_rows.extend([(t, agent, *d, rx) for d in devices])
        if self.timeseries is not None:
            rows = [(t, agent, "_host", k, v) for k, v in zip(HOST_METRICS, host_values, strict=True)
                    if v is not None]
            rows += [(t, agent, d[0], k, float(v)) for d in devices
                     for k, v in zip(DEVICE_METRICS, d[1:], strict=True) if v is not None]
            self.timeseries.add(agent, rows, *self._labels(db, agent))

    def _tele_state(self, batch: _Batch, agent: str) -> tuple[frozenset[str], bool]:
        return batch.tele.get(agent) or self._tele.get(agent) or (frozenset(), True)

    def _seen_again(self, b: _Batch, msg: Message) -> frozenset[str] | None:
        """Telemetry is evidence only when it can say something new (a device seen again): then the keys it
        lists present, else None."""
        present = frozenset(d["key"] for d in msg.payload["devices"] if d.get("present") is True)
        last, events_since = self._tele_state(b, msg.agent)
        return present if present and (present != last or events_since) else None

    def _merge(self, b: _Batch) -> None:
        self.received += b.received
        self.stored += b.stored
        self.duplicates += b.duplicates
        self.rejected.update(b.rejected)
        self.last_lag = b.lag or self.last_lag
        for agent, (t, ts) in b.clocks.items():
            self.clocks.advance(agent, ts, t)
        self._tele.update(b.tele)
        self.last_commit = time.time()
        self.last_failure = None

    def _reject(self, db: sqlite3.Connection, b: _Batch, item: Inbound, exc: ProtocolError) -> None:
        topic, payload = item.topic[:512].encode("utf-8", "replace").decode(), bytes(item.payload[:4096])
        if item.retained and db.execute(
                "SELECT 1 FROM dead_letter WHERE topic = ? AND reason = ? AND payload = ? LIMIT 1",
                (topic, exc.reason, payload)).fetchone():
            b.duplicates += 1  # a retained message refused before, delivered again with a new subscription
            return
        b.rejected[exc.reason] += 1
        db.execute("INSERT INTO dead_letter (received_at, topic, reason, detail, payload) VALUES (?,?,?,?,?)",
                   (format_epoch(item.received_at), topic, exc.reason,
                    exc.detail[:512].encode("utf-8", "replace").decode(), payload))
        now = time.monotonic()
        if now - self._log_gate.get(exc.reason, -1e9) >= 60:
            self._log_gate[exc.reason] = now
            log.warning("rejected a message on %r: %s (further %s rejections logged once a minute)",
                        item.topic[:120], exc, exc.reason)

    def _persist_counters(self, db: sqlite3.Connection, b: _Batch) -> None:
        """Counters live in the store, so /metrics adds up every ingest process."""
        deltas = {"received": b.received, "stored": b.stored, "duplicates": b.duplicates}
        deltas.update({f"rejected:{k}": v for k, v in b.rejected.items()})
        for name, d in deltas.items():
            if d:
                self.store.bump(db, name, d)
        if b.lag:
            db.execute("INSERT INTO counters VALUES ('lag_ms', ?) ON CONFLICT(name) DO UPDATE SET "
                       "value = excluded.value", (int(b.lag * 1000),))

    def _update_agent(self, db: sqlite3.Connection, agent: str, upd: dict[str, Any], b: _Batch) -> None:
        raw = upd.pop(_RAW, None)
        if raw is not None:  # the batch's last telemetry of this agent, read by a receiver: its host and devices
            p = orjson.loads(raw)
            upd["host"] = p.get("host") or HostGauges()
            upd["devices"] = p["devices"]
        db.execute("INSERT OR IGNORE INTO agents (agent) VALUES (?)", (agent,))
        last = upd.pop("last_seen", None)
        clock = b.clocks.get(agent)
        if clock is not None:
            upd["clock"] = format_epoch(clock[0])
        offset = b.offset_min.get(agent)
        if offset is not None:
            upd["clock_offset_s"] = round(offset, 3)
        values = [dumps(v) if isinstance(v, dict | list) else v for v in upd.values()]
        sets = [f"{k} = ?" if k != "clock" else "clock = max(coalesce(clock, ''), ?)" for k in upd]
        if last is not None:
            sets.append("last_seen = max(coalesce(last_seen, ''), ?)")
            values.append(last)
        if sets:
            db.execute(f"UPDATE agents SET {', '.join(sets)} WHERE agent = ?", (*values, agent))

    def _evidence(self, db: sqlite3.Connection, b: _Batch, msg: Message, stamp: str, received_at: float) -> None:
        p = msg.payload
        kind = msg.kind
        etype = p.get("type", kind) if kind == "event" else kind
        dev = p.get("device") if isinstance(p.get("device"), dict) else None
        stored = p if "ts" in p else {**p, "ts": stamp}
        flag = self._registry_flag(db, msg.agent, dev["key"]) if etype == "handling.reported" and dev else None
        seq = WILL_SEQ if msg.seq is None else msg.seq
        cur = db.execute("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at, flag) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (msg.agent, msg.boot, seq, stamp, kind, etype, dev["key"] if dev else None, dumps(stored),
                          format_epoch(received_at), flag))
        b.evidence.append(Stored(int(cur.lastrowid or 0), msg, stamp, flag))

    def _trusted_labels(self, db: sqlite3.Connection, agent: str, labels: dict[str, str]) -> dict[str, str]:
        """An enrolled PC's unit and room are the ones it was enrolled for, whatever it reports: labels decide
        which PIC sees a PC, so a PC cannot move itself into another unit."""
        row = db.execute("SELECT unit, room FROM agent_accounts WHERE agent = ?", (agent,)).fetchone()
        if row is None or (labels.get("unit"), labels.get("room")) == (row[0], row[1]):
            return labels
        log.warning("agent %s reports unit %r room %r but was enrolled for %r %r; the enrollment holds",
                    agent, labels.get("unit"), labels.get("room"), row[0], row[1])
        return {**labels, "unit": row[0], "room": row[1]}

    def _registry_flag(self, db: sqlite3.Connection, agent: str, device: str) -> str | None:
        """A handling report naming a device the registry lends to another room than this agent's."""
        lent = db.execute("SELECT room FROM loans WHERE device = ?", (device,)).fetchone()
        if lent is None or not lent[0]:
            return None
        own = db.execute("SELECT id FROM rooms WHERE agent = ?", (agent,)).fetchall()
        rooms = {r[0] for r in own}
        if not rooms:
            labels = db.execute("SELECT labels FROM agents WHERE agent = ?", (agent,)).fetchone()
            room = json.loads(labels[0]).get("room") if labels and labels[0] else None
            rooms = {room} if isinstance(room, str) else set()
        return MISMATCH if rooms and lent[0] not in rooms else None

    def _telemetry(self, db: sqlite3.Connection, b: _Batch, msg: Message, stamp: str, received_at: float,
                   upd: dict[str, Any], seen_again: frozenset[str] | None) -> None:
        p = msg.payload
        self._samples(db, b, telemetry_facts(p), received_at)
        upd["host"] = p.get("host") or HostGauges()  # serialised once per batch, in _update_agent
        upd["devices"] = p["devices"]
        upd.pop(_RAW, None)
        if seen_again:  # evidence only when it can say something new (decided once, by _seen_again)
            b.tele[msg.agent] = (seen_again, False)
            slim = Payload(v=1, agent=msg.agent, boot=msg.boot, seq=msg.seq or 0, ts=stamp, kind="telemetry",
                           devices=[DeviceObject(key=k, present=True) for k in sorted(seen_again)])
            cur = db.execute("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at) "
                             "VALUES (?,?,?,?,?,?,?,?,?)", (msg.agent, msg.boot, msg.seq, stamp, "telemetry",
                                                            "telemetry", None, dumps(slim), format_epoch(received_at)))
            b.evidence.append(Stored(int(cur.lastrowid or 0), Message(msg.topic, slim), stamp))

    # ------------------------------------------------------------------ dashboard reports
    def report_handling(self, agent: str, device_key: str, note: str, by: str) -> dict[str, Any]:
        """A handling report made at the dashboard, stored as that agent's ``handling.reported`` through
        the same validation as the agent's own. It is its own boot ``dashboard-…`` (seq 1), dated at
        now converted to the agent's clock (its clock offset), so the classifier places it in that
        agent's timeline where it happened. Returns the message, with ``flag`` set when the registry
        lends the device to another room."""
        if not note.strip() or not by.strip():
            raise ValueError("a handling report needs a note and the name of who reports it")
        if not device_key.strip():
            raise ValueError("a handling report needs the device's key")
        row = self.store.query("SELECT inventory, clock_offset_s FROM agents WHERE agent = ?", (agent,))
        if not row:
            raise ValueError(f"no room PC {agent!r} has reported to this collector")
        inventory = json.loads(row[0]["inventory"] or "[]")
        device = next((d for d in inventory if d.get("key") == device_key), {"key": device_key})
        offset = row[0]["clock_offset_s"] or 0.0
        now = time.time()
        payload = {"v": 1, "agent": agent, "boot": f"{DASHBOARD_BOOT_PREFIX}{secrets.token_hex(6)}", "seq": 1,
                   "ts": format_epoch(now - offset), "kind": "event", "type": "handling.reported", "device": device,
                   "context": {"note": note.strip()[:500], "reported_by": by.strip()[:120], "via": "dashboard"}}
        topic = str(Topic(self.prefix or DEFAULT_PREFIX, agent, "events"))
        stored = self.ingest([Inbound(topic, dumps(payload).encode(), now)])
        if not stored:
            reason = self.store.query("SELECT reason, detail FROM dead_letter ORDER BY id DESC LIMIT 1")
            why = f"{reason[0]['reason']}: {reason[0]['detail']}" if reason else "not stored"
            raise ValueError(f"the report was refused ({why})")
        return {**payload, "flag": stored[0].flag}

    # ------------------------------------------------------------------ helpers
    def _labels(self, db: sqlite3.Connection, agent: str) -> tuple[dict[str, str], dict[str, str]]:
        """The agent's labels (unit, room) and the kind of each device in its inventory."""
        row = db.execute("SELECT labels, inventory FROM agents WHERE agent = ?", (agent,)).fetchone()
        if not row:
            return {}, {}
        labels = json.loads(row[0]) if row[0] else {}
        inventory = json.loads(row[1]) if row[1] else []
        return labels, {d["key"]: str(d.get("kind", "unknown")) for d in inventory if isinstance(d, dict)}

    def health(self, stall_s: float = 30.0) -> list[str]:
        """Reasons the ingest path is unhealthy now (empty when healthy)."""
        if self.last_failure is not None:
            return [f"the store refuses writes: {self.last_failure}"]
        return []

    def metrics(self) -> dict[str, Any]:
        """Totals since the store was created, over every ingest process."""
        c = self.store.counters()
        dl = self.store.query("SELECT count(*) AS n FROM dead_letter")[0]["n"]
        return {"received": c.get("received", 0), "stored": c.get("stored", 0),
                "duplicates": c.get("duplicates", 0),
                "rejected": {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:")},
                "lag_s": c.get("lag_ms", 0) / 1000, "dead_letters": dl,
                "buffer_depth": self.timeseries.buffer_depth() if self.timeseries is not None else 0,
                "seconds_since_commit": round(time.time() - self.last_commit, 3)}

