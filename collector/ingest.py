"""Ingest: validate, dedup, store, classify.

Transport-free: the MQTT subscriber, replay-through-the-live-path tests and the benchmarks
all feed ``Collector.ingest``. One batch is one transaction; the subscriber acknowledges a
message to the broker only after the batch holding it is committed.

Kept lean for throughput: a telemetry message is one host row plus one row per device, the
agents table is updated once per agent per batch, and telemetry becomes policy evidence only
when it says something new (the set of present devices changed, or device events came since).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from collector.classify import evaluate
from collector.incidents import IncidentBook
from collector.policy import Windows
from collector.store.sqlite import DEVICE_METRICS, HOST_METRICS, SqliteStore, dumps
from collector.timeline import AgentHistory, CaptureClock, evidence_from
from common.protocol import (
    SPEED_RANK,
    Message,
    ProtocolError,
    Topic,
    decode_message,
    format_epoch,
    now_ts,
    ts_seconds,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    received_at: float  # wall clock, seconds
    stamp: str | None = None  # a capture's received_at, used for messages without ts



def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _flag(v: Any) -> int | None:
    return (1 if v else 0) if isinstance(v, bool) else None


class Collector:
    def __init__(self, store: SqliteStore, windows: Windows | None = None, prefix: str | None = None,
                 dead_letter_max: int = 1000, lang: str = "id", timeseries: Any = None,
                 classify_every_s: float = 0.0, classify: bool = True) -> None:
        self.store = store
        self.windows = windows or Windows()
        self.prefix = prefix
        self.dead_letter_max = dead_letter_max
        self.book = IncidentBook(store, lang)
        self.timeseries = timeseries  # an optional second sink (InfluxDB)
        self.classify_every_s = classify_every_s
        self.classifying = classify  # False in an ingest worker: the main process classifies
        self._followed = 0  # evidence id read so far (follow mode)
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.last_lag = 0.0
        self._log_gate: dict[str, float] = {}
        self.histories: dict[str, AgentHistory] = {}
        self.deadlines: dict[str, float] = {}  # agent -> earliest pending window end
        self.keep_from: dict[str, float] = {}  # agent -> oldest ts its incidents still need
        self._dirty: set[str] = set()
        self._last_classify = 0.0
        self._present: dict[str, frozenset[str]] = {}  # agent -> present set of its last telemetry evidence
        self._events_since_telemetry: set[str] = set()
        self.capture_clock = CaptureClock()
        self.lock = threading.RLock()  # the ingest worker and the maintenance tick share this state
        self._load()

    @property
    def horizon_s(self) -> float:
        """How far back evidence can still change a decision."""
        w = self.windows
        return w.reopen_s + w.handling_s + max(w.missing_s, w.unstable_s) + 3600

    def _load(self) -> None:
        if not self.classifying:
            return
        row = self.store.query("SELECT max(ts) AS ts FROM evidence")[0]
        if row["ts"] is None:
            return
        latest = ts_seconds(row["ts"])
        since = latest - self.horizon_s
        for inc in self.store.query("SELECT min(opened_at) AS t FROM incidents WHERE status != 'withdrawn'"):
            if inc["t"] is not None:
                since = min(since, ts_seconds(inc["t"]) - self.windows.handling_s)
        self._followed = self._read_evidence("ts >= ?", (format_epoch(since),))
        self._dirty |= set(self.histories)

    def _read_evidence(self, where: str, args: tuple[Any, ...]) -> int:
        last = self._followed
        for r in self.store.query(f"SELECT id, agent, boot, seq, ts, kind, payload FROM evidence WHERE {where} "
                                  "ORDER BY id", args):
            payload = json.loads(r["payload"])
            channel = {"event": "events"}.get(r["kind"], r["kind"])
            ev = evidence_from(Message(Topic("-", r["agent"], channel), payload), r["ts"])
            if ev is not None and self.histories.setdefault(r["agent"], AgentHistory(r["agent"])).add(ev):
                self._dirty.add(r["agent"])
            self._advance(r["ts"])
            last = max(last, int(r["id"]))
        return last

    def follow(self) -> None:
        """Classify what ingest workers (other processes) stored since the last call."""
        with self.lock:
            self._followed = self._read_evidence("id > ?", (self._followed,))
            clock = self.store.counters().get("clock_ms")
            if clock is not None and (self.clock is None or clock / 1000 > self.clock):
                self._advance(format_epoch(clock / 1000))
            if self.clock is not None:
                self._dirty |= {a for a, end in self.deadlines.items() if self.clock > end}
            self.classify_dirty()

    @property
    def clock(self) -> float | None:
        return self.capture_clock.t

    @property
    def clock_str(self) -> str | None:
        return self.capture_clock.ts

    def _advance(self, ts: str) -> None:
        self.capture_clock.advance(ts)

    def _reject(self, db: Any, item: Inbound, exc: ProtocolError) -> None:
        self.rejected[exc.reason] += 1
        db.execute("INSERT INTO dead_letter (received_at, topic, reason, detail, payload) VALUES (?,?,?,?,?)",
                   (format_epoch(item.received_at), item.topic[:512], exc.reason, exc.detail[:512],
                    item.payload[:4096]))
        now = time.monotonic()
        if now - self._log_gate.get(exc.reason, -1e9) >= 60:
            self._log_gate[exc.reason] = now
            log.warning("rejected a message on %s: %s (further %s rejections logged once a minute)",
                        item.topic[:120], exc, exc.reason)

    # ------------------------------------------------------------------ the batch
    def ingest(self, items: list[Inbound]) -> None:
        """Validate, dedup and store one batch in one transaction, then classify what changed."""
        with self.lock:
            self._ingest(items)

    def _ingest(self, items: list[Inbound]) -> None:
        host_rows: list[tuple[Any, ...]] = []
        device_rows: list[tuple[Any, ...]] = []
        agent_updates: dict[str, dict[str, Any]] = {}
        before = (self.received, self.stored, self.duplicates, Counter(self.rejected))
        with self.store.tx() as db:
            for item in items:
                self.received += 1
                try:
                    msg = decode_message(item.topic, item.payload, self.prefix)
                except ProtocolError as exc:
                    self._reject(db, item, exc)
                    continue
                if msg.seq is not None and not self.store.mark_seen(db, msg.agent, msg.boot, msg.seq):
                    self.duplicates += 1
                    continue
                stamp = self.capture_clock.stamp(msg.ts, item.stamp, format_epoch(item.received_at))
                assert stamp is not None
                self._advance(stamp)
                self.last_lag = max(0.0, item.received_at - ts_seconds(stamp))
                upd = agent_updates.setdefault(msg.agent, {})
                if upd.get("last_seen") is None or stamp > upd["last_seen"]:
                    upd["last_seen"] = stamp
                if msg.kind == "telemetry":
                    self._telemetry(db, msg, stamp, item.received_at, host_rows, device_rows, upd)
                else:
                    self._evidence(db, msg, stamp, item.received_at)
                    self._events_since_telemetry.add(msg.agent)
                    if msg.kind == "state":
                        p = msg.payload
                        upd.update(state=p["state"], reason=p.get("reason"), boot=msg.boot)
                        for k in ("hostname", "version", "platform"):
                            if p.get(k) is not None:
                                upd[k] = p[k]
                        if isinstance(p.get("labels"), dict):
                            upd["labels"] = dumps(p["labels"])
                    elif msg.kind == "inventory":
                        upd["inventory"] = dumps(msg.payload["devices"])
                self.stored += 1
            SqliteStore.add_samples(db, host_rows, device_rows)
            for agent, upd in agent_updates.items():
                self._update_agent(db, agent, upd)
            dead = db.execute("SELECT max(id) FROM dead_letter").fetchone()[0]
            if dead and dead > self.dead_letter_max:
                db.execute("DELETE FROM dead_letter WHERE id <= ?", (dead - self.dead_letter_max,))
            self._persist_counters(db, before)
        if not self.classifying:
            return
        if self.clock is not None:
            self._dirty |= {a for a, end in self.deadlines.items() if self.clock > end}
        if time.monotonic() - self._last_classify >= self.classify_every_s:
            self.classify_dirty()

    def report_handling(self, agent: str, device_key: str, note: str, by: str) -> dict[str, Any]:
        """A handling report made at the dashboard: recorded as that agent's ``handling.reported``
        event, through the same validation and store as the agent's own. Each report is a boot of
        its own (seq 1), so it is ordered by its own time among the agent's boots."""
        if not note.strip() or not by.strip():
            raise ValueError("a handling report needs a note and the name of who reports it")
        row = self.store.query("SELECT inventory FROM agents WHERE agent = ?", (agent,))
        if not row:
            raise ValueError(f"no room PC {agent!r} has reported to this collector")
        inventory = json.loads(row[0]["inventory"] or "[]")
        device = next((d for d in inventory if d.get("key") == device_key), {"key": device_key})
        with self.lock:
            stamp = now_ts()
            payload = {"v": 1, "agent": agent, "boot": f"dashboard-{secrets.token_hex(6)}", "seq": 1, "ts": stamp,
                       "kind": "event",
                       "type": "handling.reported", "device": device,
                       "context": {"note": note.strip()[:500], "reported_by": by.strip()[:120], "via": "dashboard"}}
            self.ingest([Inbound(f"pantau/v1/agents/{agent}/events", json.dumps(payload).encode(), time.time())])
            self.classify_dirty()
        return payload

    def _persist_counters(self, db: Any, before: tuple[int, int, int, Counter[str]]) -> None:
        """Counters live in the store, so /metrics adds up every ingest process."""
        deltas = {"received": self.received - before[0], "stored": self.stored - before[1],
                  "duplicates": self.duplicates - before[2]}
        deltas.update({f"rejected:{k}": v - before[3].get(k, 0) for k, v in self.rejected.items()})
        for name, d in deltas.items():
            if d:
                SqliteStore.bump(db, name, d)
        if self.clock is not None:
            db.execute("INSERT INTO counters VALUES ('clock_ms', ?) ON CONFLICT(name) DO UPDATE SET "
                       "value = max(value, excluded.value)", (int(self.clock * 1000),))
        db.execute("INSERT INTO counters VALUES ('lag_ms', ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                   (int(self.last_lag * 1000),))

    def _update_agent(self, db: Any, agent: str, upd: dict[str, Any]) -> None:
        db.execute("INSERT OR IGNORE INTO agents (agent) VALUES (?)", (agent,))
        last = upd.pop("last_seen")
        values = [dumps(v) if isinstance(v, dict | list) else v for v in upd.values()]
        sets = ", ".join(f"{k} = ?" for k in upd)
        db.execute(f"UPDATE agents SET {sets + ', ' if sets else ''}last_seen = max(coalesce(last_seen, ''), ?) "
                   "WHERE agent = ?", (*values, last, agent))

    def _evidence(self, db: Any, msg: Message, stamp: str, received_at: float) -> None:
        p = msg.payload
        kind = msg.kind
        etype = p.get("type", kind) if kind == "event" else kind
        dev = p.get("device") if isinstance(p.get("device"), dict) else None
        stored = p if "ts" in p else {**p, "ts": stamp}
        seq = msg.seq if msg.seq is not None else -1
        db.execute("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at) "
                   "VALUES (?,?,?,?,?,?,?,?,?)",
                   (msg.agent, msg.boot, seq, stamp, kind, etype, dev["key"] if dev else None, dumps(stored),
                    format_epoch(received_at)))
        self._feed(msg, stamp)

    def _telemetry(self, db: Any, msg: Message, stamp: str, received_at: float, host_rows: list[tuple[Any, ...]],
                   device_rows: list[tuple[Any, ...]], upd: dict[str, Any]) -> None:
        p = msg.payload
        t = ts_seconds(stamp)
        host = p.get("host") if isinstance(p.get("host"), dict) else {}
        host_values = [_num(host.get(k)) for k in HOST_METRICS]
        host_rows.append((t, msg.agent, *host_values))
        devices = [(d["key"], (_flag(d.get("present")), _flag(d.get("in_use")), _num(d.get("errors_total")),
                               _num(d.get("resets_total")), SPEED_RANK.get(d.get("speed", ""))))
                   for d in p["devices"]]
        device_rows.extend((t, msg.agent, key, *values) for key, values in devices)
        upd["host"] = host  # serialised once per batch, in _update_agent
        upd["devices"] = p["devices"]
        if self.timeseries is not None:
            rows = [(t, msg.agent, "_host", k, v) for k, v in zip(HOST_METRICS, host_values, strict=True)
                    if v is not None]
            rows += [(t, msg.agent, key, k, float(v)) for key, values in devices
                     for k, v in zip(DEVICE_METRICS, values, strict=True) if v is not None]
            self.timeseries.add(msg.agent, rows, *self._labels(db, msg.agent))
        present = frozenset(d["key"] for d in p["devices"] if d.get("present") is True)
        if present and (present != self._present.get(msg.agent) or msg.agent in self._events_since_telemetry):
            # evidence only when it can say something new: a device seen again
            self._present[msg.agent] = present
            self._events_since_telemetry.discard(msg.agent)
            slim = {"v": 1, "agent": msg.agent, "boot": msg.boot, "seq": msg.seq, "ts": stamp, "kind": "telemetry",
                    "devices": [{"key": k, "present": True} for k in sorted(present)]}
            db.execute("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at) "
                       "VALUES (?,?,?,?,?,?,?,?,?)", (msg.agent, msg.boot, msg.seq, stamp, "telemetry", "telemetry",
                                                      None, dumps(slim), format_epoch(received_at)))
            self._feed(Message(msg.topic, slim), stamp)

    def _feed(self, msg: Message, stamp: str) -> None:
        if not self.classifying:
            return
        ev = evidence_from(msg, stamp)
        if ev is None:
            return
        hist = self.histories.setdefault(msg.agent, AgentHistory(msg.agent))
        if hist.add(ev):
            self._dirty.add(msg.agent)

    # ------------------------------------------------------------------ classification
    def classify_dirty(self) -> None:
        with self.lock:
            self._last_classify = time.monotonic()
            dirty, self._dirty = self._dirty, set()
            for agent in dirty:
                self.classify(agent)

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def classify(self, agent: str) -> list[str]:
        hist = self.histories.get(agent)
        if hist is None or self.clock is None:
            return []
        rank = hist.boot_rank()
        pending: list[float] = []
        incidents = evaluate(hist, self.clock, self.windows, pending)
        if pending:
            self.deadlines[agent] = min(pending)
        else:
            self.deadlines.pop(agent, None)
        w = self.windows
        needed = [i.first.ts for i in incidents if i.resolved_ts is None or i.resolved_ts + w.reopen_s >= self.clock]
        self.keep_from[agent] = min([self.clock - self.horizon_s, *(t - w.handling_s for t in needed)])
        since = hist.items[0].ts if hist.items else None  # older incidents are out of the evaluated window
        return self.book.sync(agent, [(inc, rank) for inc in incidents], self.clock_str or "", since)

    def tick(self) -> None:
        """Classify everything pending and forget evidence no decision can need any more."""
        with self.lock:
            self._dirty |= set(self.histories)
            self.classify_dirty()
            for agent, before in self.keep_from.items():
                hist = self.histories.get(agent)
                if hist is not None:
                    hist.prune(before)

    # ------------------------------------------------------------------ helpers
    def _labels(self, db: Any, agent: str) -> tuple[dict[str, str], dict[str, str]]:
        """The agent's labels (unit, room) and the kind of each device in its inventory."""
        row = db.execute("SELECT labels, inventory FROM agents WHERE agent = ?", (agent,)).fetchone()
        if not row:
            return {}, {}
        labels = json.loads(row[0]) if row[0] else {}
        inventory = json.loads(row[1]) if row[1] else []
        return labels, {d["key"]: str(d.get("kind", "unknown")) for d in inventory if isinstance(d, dict)}

    def metrics(self) -> dict[str, Any]:
        """Totals since the store was created, over every ingest process."""
        c = self.store.counters()
        dl = self.store.query("SELECT count(*) AS n FROM dead_letter")[0]["n"]
        return {"received": c.get("received", 0), "stored": c.get("stored", 0),
                "duplicates": c.get("duplicates", 0),
                "rejected": {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:")},
                "lag_s": c.get("lag_ms", 0) / 1000, "dead_letters": dl,
                "buffer_depth": self.timeseries.buffer_depth() if self.timeseries is not None else 0}
