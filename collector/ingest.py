"""Ingest: validate, dedup, store, classify — one batch, one transaction.

Transport-free: the MQTT subscriber, replay-through-the-live-path tests and the
benchmarks all feed ``Collector.ingest``. A message is acknowledged to the broker only
after the batch holding it is committed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent.protocol import KIND_OF_CHANNEL, SPEED_RANK, Message, ProtocolError, Topic, decode_message, parse_ts
from collector.classify import evaluate
from collector.incidents import IncidentBook
from collector.policy import Windows
from collector.store.sqlite import SqliteStore, dumps
from collector.timeline import AgentHistory, evidence_from

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    received_at: float  # wall clock, seconds
    stamp: str | None = None  # a capture's received_at, used for messages without ts


def _fmt(t: float) -> str:
    from datetime import UTC, datetime

    from agent.protocol import format_ts

    return format_ts(datetime.fromtimestamp(t, UTC))


class Collector:
    def __init__(self, store: SqliteStore, windows: Windows | None = None, prefix: str | None = None,
                 dead_letter_max: int = 1000, lang: str = "id", timeseries: Any = None) -> None:
        self.store = store
        self.windows = windows or Windows()
        self.prefix = prefix
        self.dead_letter_max = dead_letter_max
        self.book = IncidentBook(store, lang)
        self.timeseries = timeseries  # an optional second sink (InfluxDB)
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.last_lag = 0.0
        self._log_gate: dict[str, float] = {}
        self.histories: dict[str, AgentHistory] = {}
        self.deadlines: dict[str, float] = {}  # agent -> earliest pending window end
        self.clock: float | None = None
        self.clock_str: str | None = None
        self._load()

    def _load(self) -> None:
        for r in self.store.query("SELECT agent, boot, seq, ts, kind, payload FROM evidence ORDER BY id"):
            payload = json.loads(r["payload"])
            channel = {"event": "events"}.get(r["kind"], r["kind"])
            msg = Message(Topic("-", r["agent"], channel), payload)
            ev = evidence_from(msg, r["ts"])
            if ev is not None:
                self.histories.setdefault(r["agent"], AgentHistory(r["agent"])).add(ev)
            self._advance(r["ts"])

    def _advance(self, ts: str) -> None:
        t = parse_ts(ts).timestamp()
        if self.clock is None or t > self.clock:
            self.clock, self.clock_str = t, ts

    def _reject(self, db: Any, item: Inbound, exc: ProtocolError) -> None:
        self.rejected[exc.reason] += 1
        db.execute("INSERT INTO dead_letter (received_at, topic, reason, detail, payload) VALUES (?,?,?,?,?)",
                   (_fmt(item.received_at), item.topic[:512], exc.reason, exc.detail[:512], item.payload[:4096]))
        now = time.monotonic()
        if now - self._log_gate.get(exc.reason, -1e9) >= 60:
            self._log_gate[exc.reason] = now
            log.warning("rejected a message on %s: %s (further %s rejections logged once a minute)",
                        item.topic[:120], exc, exc.reason)

    def ingest(self, items: list[Inbound]) -> None:
        """Validate, dedup and store one batch in one transaction, then re-classify."""
        dirty: set[str] = set()
        with self.store.tx() as db:
            for item in items:
                self.received += 1
                try:
                    msg = decode_message(item.topic, item.payload, self.prefix)
                except ProtocolError as exc:
                    self._reject(db, item, exc)
                    continue
                if msg.seq is not None and not SqliteStore.mark_seen(db, msg.agent, msg.boot, msg.seq):
                    self.duplicates += 1
                    continue
                # A will has no ts: the capture's received_at, else the clock as it stands, else now.
                stamp = msg.ts or item.stamp or self.clock_str or _fmt(item.received_at)
                self._store(db, msg, stamp, item.received_at)
                self._advance(stamp)
                self.last_lag = max(0.0, item.received_at - parse_ts(stamp).timestamp())
                if self._feed(msg, stamp):
                    dirty.add(msg.agent)
                self.stored += 1
            dead = db.execute("SELECT max(id) FROM dead_letter").fetchone()[0]
            if dead and dead > self.dead_letter_max:
                db.execute("DELETE FROM dead_letter WHERE id <= ?", (dead - self.dead_letter_max,))
        if self.timeseries is not None:
            self.timeseries.flush_pending()
        if self.clock is not None:
            dirty |= {a for a, end in self.deadlines.items() if self.clock > end}
        for agent in dirty:
            self.classify(agent)

    def _feed(self, msg: Message, stamp: str) -> bool:
        ev = evidence_from(msg, stamp)
        if ev is None:
            return False
        hist = self.histories.setdefault(msg.agent, AgentHistory(msg.agent))
        return hist.add(ev)

    def classify(self, agent: str) -> list[str]:
        hist = self.histories.get(agent)
        if hist is None or self.clock is None:
            return []
        rank = hist.boot_rank()
        pending: list[float] = []
        computed = [(inc, rank) for inc in evaluate(hist, self.clock, self.windows, pending)]
        if pending:
            self.deadlines[agent] = min(pending)
        else:
            self.deadlines.pop(agent, None)
        return self.book.sync(agent, computed, self.clock_str or "")

    def tick(self) -> None:
        """Re-classify every agent: windows elapse as the clock moves."""
        for agent in list(self.histories):
            self.classify(agent)

    def _store(self, db: Any, msg: Message, stamp: str, received_at: float) -> None:
        p = msg.payload
        kind = msg.kind
        seq = msg.seq if msg.seq is not None else -1
        rec = _fmt(received_at)
        if kind == "telemetry":
            t = parse_ts(stamp).timestamp()
            rows = [(t, msg.agent, "_host", k, float(v)) for k, v in (p.get("host") or {}).items()
                    if isinstance(v, int | float) and not isinstance(v, bool)]
            for d in p["devices"]:
                for k in ("present", "in_use"):
                    if isinstance(d.get(k), bool):
                        rows.append((t, msg.agent, d["key"], k, 1.0 if d[k] else 0.0))
                for k in ("errors_total", "resets_total"):
                    if isinstance(d.get(k), int | float) and not isinstance(d.get(k), bool):
                        rows.append((t, msg.agent, d["key"], k, float(d[k])))
                if d.get("speed") in SPEED_RANK:
                    rows.append((t, msg.agent, d["key"], "speed_rank", float(SPEED_RANK[d["speed"]])))
            SqliteStore.add_samples(db, rows)
            if self.timeseries is not None:
                self.timeseries.add(msg.agent, rows, *self._labels(db, msg.agent))
            present = [{"key": d["key"], "present": True} for d in p["devices"] if d.get("present") is True]
            if present:
                db.execute("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at) "
                           "VALUES (?,?,?,?,?,?,?,?,?)",
                           (msg.agent, msg.boot, seq, stamp, kind, kind, None,
                            dumps({**{k: p[k] for k in ("v", "agent", "boot", "kind")}, "seq": seq, "ts": stamp,
                                   "devices": present}), rec))
            db.execute("UPDATE agents SET host = ?, devices = ?, last_seen = max(coalesce(last_seen, ''), ?) "
                       "WHERE agent = ?", (dumps(p.get("host") or {}), dumps(p["devices"]), stamp, msg.agent))
            if db.execute("SELECT changes()").fetchone()[0] == 0:
                db.execute("INSERT INTO agents (agent, host, devices, last_seen) VALUES (?,?,?,?)",
                           (msg.agent, dumps(p.get("host") or {}), dumps(p["devices"]), stamp))
            return
        etype = p.get("type", kind) if kind == "event" else kind
        dev = p.get("device") if isinstance(p.get("device"), dict) else None
        stored_payload = dict(p)
        stored_payload.setdefault("ts", stamp)
        db.execute("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at) "
                   "VALUES (?,?,?,?,?,?,?,?,?)",
                   (msg.agent, msg.boot, seq, stamp, kind, etype, dev["key"] if dev else None, dumps(stored_payload),
                    rec))
        db.execute("INSERT OR IGNORE INTO agents (agent) VALUES (?)", (msg.agent,))
        db.execute("UPDATE agents SET last_seen = max(coalesce(last_seen, ''), ?) WHERE agent = ?", (stamp, msg.agent))
        if kind == "state":
            db.execute("UPDATE agents SET state=?, reason=?, boot=?, hostname=coalesce(?, hostname), "
                       "version=coalesce(?, version), platform=coalesce(?, platform), labels=coalesce(?, labels) "
                       "WHERE agent=?",
                       (p["state"], p.get("reason"), msg.boot, p.get("hostname"), p.get("version"), p.get("platform"),
                        dumps(p["labels"]) if isinstance(p.get("labels"), dict) else None, msg.agent))
        elif kind == "inventory":
            db.execute("UPDATE agents SET inventory = ? WHERE agent = ?", (dumps(p["devices"]), msg.agent))

    def _labels(self, db: Any, agent: str) -> tuple[dict[str, str], dict[str, str]]:
        """The agent's labels (unit, room) and the kind of each device in its inventory."""
        row = db.execute("SELECT labels, inventory FROM agents WHERE agent = ?", (agent,)).fetchone()
        if not row:
            return {}, {}
        labels = json.loads(row[0]) if row[0] else {}
        inventory = json.loads(row[1]) if row[1] else []
        return labels, {d["key"]: str(d.get("kind", "unknown")) for d in inventory if isinstance(d, dict)}

    def metrics(self) -> dict[str, Any]:
        dl = self.store.query("SELECT count(*) AS n FROM dead_letter")[0]["n"]
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "rejected": dict(self.rejected), "lag_s": self.last_lag, "dead_letters": dl,
                "buffer_depth": self.timeseries.buffer_depth() if self.timeseries is not None else 0}


__all__ = ["KIND_OF_CHANNEL", "Collector", "Inbound"]
