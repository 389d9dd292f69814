"""The classifier: follows the stored evidence, one agent at a time on that agent's own clock.

It owns the per-agent histories, clocks, window deadlines and pruning, evaluates the policy
(``classify.evaluate``, a pure function) and records what changed (``IncidentBook``). It is fed
only committed evidence: ``accept`` in the ingesting process, ``follow`` (reading the store by row
id) when ingest workers in other processes store it. Nothing one agent sends touches another
agent's history, clock, deadlines or pruning.

Settled decisions stay: evidence older than an agent's horizon is forgotten, and an incident
that read any of it is final (see ``IncidentBook.sync``); the horizon is kept in the store, so a
restart loads exactly what was kept and decides exactly as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from collector.classify import evaluate
from collector.incidents import IncidentBook
from collector.ingestor import MISMATCH, Stored
from collector.policy import Windows
from collector.store import LostLead, store_failure
from collector.store.sqlite import SqliteStore
from collector.timeline import AgentHistory, evidence_from
from common.protocol import Message, ProtocolError, Topic, format_epoch, now_ts, ts_seconds, ts_seconds_or_none

log = logging.getLogger(__name__)
_CHANNEL = {"event": "events"}


class Classifier:
    def __init__(self, store: SqliteStore, windows: Windows | None = None, lang: str = "id",
                 classify_every_s: float = 0.0, book: IncidentBook | None = None) -> None:
        self.store = store
        self.windows = windows or Windows()
        self.book = book or IncidentBook(store, lang)
        self.classify_every_s = classify_every_s
        self.histories: dict[str, AgentHistory] = {}
        self.clocks: dict[str, float] = {}  # agent -> its clock (greatest ts), seconds
        self.deadlines: dict[str, float] = {}  # agent -> earliest pending window end, on its clock
        self.keep_from: dict[str, float] = {}  # agent -> oldest ts its undecided incidents still read
        self.cut: dict[str, float] = {}  # agent -> evidence before this was forgotten (persisted)
        self.pinned: dict[str, tuple[Any, ...]] = {}  # agent -> evidence kept whatever its age (its last inventory)
        self.skipped = 0  # stored rows no policy can read (kept in the store, logged)
        self._dirty: set[str] = set()
        self._followed = 0  # evidence id read so far
        self._clock_rows: dict[str, str] = {}
        self._last_classify = 0.0
        self._leases: dict[str, float] = {}
        self._leases_read = float("-inf")
        self._boots_read = float("-inf")
        self.lock = threading.RLock()
        self._load()

    @property
    def horizon_s(self) -> float:
        """How far back evidence can still change a decision."""
        w = self.windows
        return w.reopen_s + w.handling_s + max(w.missing_s, w.unstable_s) + 3600

    # ------------------------------------------------------------------ feeding
    def _load(self) -> None:
        """Each agent's clock and kept evidence, as before the restart."""
        with self.lock:
            top = self.store.query("SELECT max(id) AS id FROM evidence")[0]["id"] or 0
            for r in self.store.query("SELECT agent, clock, horizon FROM agents"):
                agent = r["agent"]
                self._advance_clock(agent, r["clock"])
                clock = self.clocks.get(agent)
                if clock is None:
                    continue
                cut = r["horizon"] if r["horizon"] is not None else self._first_cut(agent, clock)
                self.cut[agent] = cut
                rows = self.store.query(
                    "SELECT id, agent, boot, seq, ts, kind, payload, flag FROM evidence "
                    "WHERE agent = ? AND id <= ? AND ts >= ? ORDER BY id", (agent, top, _floor_ts(cut)))
                self._add_rows(rows, cut)
                # its latest inventory is kept whatever its age (the next start's absences read it)
                self._add_rows(self.store.query(
                    "SELECT id, agent, boot, seq, ts, kind, payload, flag FROM evidence WHERE agent = ? AND "
                    "kind = 'inventory' AND id <= ? ORDER BY id DESC LIMIT 1", (agent, top)), force=True)
                self._read_boots(agent)
            self._followed = top
            self._dirty |= set(self.histories)

    def _first_cut(self, agent: str, clock: float) -> float:
        """Where an agent's kept evidence starts when no horizon was recorded yet (a store from before
        1.1): its clock minus the horizon, or earlier where an undecided incident — open, or resolved less
        than the reopen window ago — still reads further back."""
        cut = clock - self.horizon_s
        w = self.windows
        for r in self.store.query("SELECT opened_at, resolved_at, status, needs_from FROM incidents "
                                  "WHERE agent = ? AND status IN ('open', 'resolved')", (agent,)):
            resolved = ts_seconds_or_none(r["resolved_at"])
            if r["status"] == "resolved" and (resolved is None or clock > resolved + w.reopen_s):
                continue
            opened = ts_seconds_or_none(r["opened_at"])
            needs = r["needs_from"] if r["needs_from"] is not None else (
                None if opened is None else opened - w.handling_s)
            if needs is not None:
                cut = min(cut, float(needs))
        return cut

    def _add_rows(self, rows: Iterable[dict[str, Any]], cut: float | None = None, force: bool = False) -> None:
        for r in rows:
            try:
                msg = Message(Topic("-", r["agent"], _CHANNEL.get(r["kind"], r["kind"])), json.loads(r["payload"]))
                ev = evidence_from(msg, r["ts"], mismatch=r["flag"] == MISMATCH)
            except (ValueError, KeyError, TypeError) as exc:
                self.skipped += 1
                log.warning("evidence row %s of %s cannot be read (%s); left out of decisions", r["id"], r["agent"],
                            exc)
                continue
            if ev is None or (not force and cut is not None and ev.ts < cut):
                continue
            self._add(ev, force)

    def _add(self, ev: Any, force: bool = False) -> None:
        hist = self.histories.get(ev.agent)
        if hist is None:
            hist = self.histories[ev.agent] = AgentHistory(ev.agent)
        if not force and ev.ts < self.cut.get(ev.agent, float("-inf")):
            return  # older than what this agent keeps: it can no longer change a decision
        if hist.add(ev):
            self._dirty.add(ev.agent)

    def _read_boots(self, agent: str) -> None:
        hist = self.histories.get(agent)
        if hist is None:
            return
        for r in self.store.query("SELECT boot, last_ts FROM boots WHERE agent = ? AND last_ts IS NOT NULL", (agent,)):
            if hist.note(r["boot"], float(r["last_ts"])):
                self._dirty.add(agent)

    def _advance_clock(self, agent: str, ts: str | None) -> bool:
        """Take an agent's clock as stored; True if it changed."""
        if ts is None or self._clock_rows.get(agent) == ts:
            return False
        self._clock_rows[agent] = ts
        try:
            t = ts_seconds(ts)
        except ProtocolError:
            return False
        self._set_clock(agent, t)
        return True

    def _set_clock(self, agent: str, t: float) -> None:
        if t > self.clocks.get(agent, float("-inf")):
            self.clocks[agent] = t
            end = self.deadlines.get(agent)
            if end is not None and t > end:
                self._dirty.add(agent)

    def accept(self, stored: list[Stored], clocks: dict[str, float],
               boot_ts: dict[tuple[str, str], float] | None = None) -> None:
        """Committed evidence and the clocks (and boots' latest ts) it moved, from the ingestor in this process."""
        with self.lock:
            for s in stored:
                ev = evidence_from(s.msg, s.stamp, mismatch=s.flag == MISMATCH)
                if ev is not None:
                    self._add(ev)
                self._followed = max(self._followed, s.id)
            for (agent, boot), t in (boot_ts or {}).items():
                hist = self.histories.get(agent)
                if hist is None:
                    hist = self.histories[agent] = AgentHistory(agent)
                hist.note(boot, t)
            for agent, t in clocks.items():
                self._set_clock(agent, t)
            if time.monotonic() - self._last_classify >= self.classify_every_s:
                self.classify_dirty()

    def follow(self, limit: int = 5000) -> None:
        """Classify what ingest workers (other processes) committed since the last call."""
        with self.lock:
            while True:
                rows = self.store.query("SELECT id, agent, boot, seq, ts, kind, payload, flag FROM evidence "
                                        "WHERE id > ? ORDER BY id LIMIT ?", (self._followed, limit))
                if not rows:
                    break
                self._add_rows(rows)
                self._followed = int(rows[-1]["id"])
            every = time.monotonic() - self._boots_read >= 30.0
            for r in self.store.query("SELECT agent, clock FROM agents WHERE clock IS NOT NULL"):
                # its boots' latest ts move with its clock, and (a clock gone back at a restart) without it
                if self._advance_clock(r["agent"], r["clock"]) or every:
                    self._read_boots(r["agent"])
            if every:
                self._boots_read = time.monotonic()
            self.classify_dirty()

    # ------------------------------------------------------------------ deciding
    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def classify_dirty(self) -> None:
        with self.lock:
            self._last_classify = time.monotonic()
            dirty, self._dirty = self._dirty, set()
            order = sorted(dirty)
            for n, agent in enumerate(order):
                try:
                    self.classify(agent)
                except LostLead:  # another collector classifies now: this one stops before its next write
                    self._dirty |= set(order[n:])
                    log.info("not recording decisions: this collector no longer holds the lead")
                    return
                except Exception as exc:  # one agent's failure must not stop the others' decisions
                    if store_failure(exc):  # the store refused (a full disk, a lost connection): again later
                        log.warning("recording %s's incidents failed (%s); tried again", agent, exc)
                        self._dirty.add(agent)
                        continue
                    log.exception("classifying %s failed; it is tried again with its next evidence", agent)

    def classify(self, agent: str) -> list[str]:
        hist = self.histories.get(agent)
        clock = self.clocks.get(agent)
        if hist is None or clock is None:
            return []
        w = self.windows
        pending: list[float] = []
        keep: list[float] = []
        pin: list[Any] = []
        incidents = evaluate(hist, clock, w, pending, self._not_expected(agent), keep, pin)
        self.pinned[agent] = tuple(pin)
        if pending:
            self.deadlines[agent] = min(pending)
        else:
            self.deadlines.pop(agent, None)
        cut = self.cut.get(agent, float("-inf"))
        needed = [i.needs_from(w) for i in incidents if not i.settled(clock, w)]
        self.keep_from[agent] = min([clock - self.horizon_s, *needed, *keep])
        settled_before = clock - w.reopen_s - max(w.missing_s, w.unstable_s)
        return self.book.sync(agent, incidents, now_ts(), w, lambda needs_from: needs_from < cut, settled_before)

    def _not_expected(self, agent: str) -> dict[str, float]:
        """Devices no longer expected in any room: a lease that ended (at the end of its ``lease_end``
        day, UTC) or a recorded return (``returned_at``). Read from the
        registry at most every few seconds; the same map serves every agent."""
        now = time.monotonic()
        if now - self._leases_read < 5.0:
            return self._leases
        out: dict[str, float] = {}
        for r in self.store.query("SELECT device, lease_end, returned_at FROM loans "
                                  "WHERE lease_end IS NOT NULL OR returned_at IS NOT NULL"):
            ends = [t for t in (_day_end(r["lease_end"]), ts_seconds_or_none(r["returned_at"])) if t is not None]
            if ends:
                out[r["device"]] = min(ends)
        self._leases, self._leases_read = out, now
        return out

    def tick(self) -> None:
        """Classify everything pending, then forget evidence no undecided incident can read.

        An agent's horizon only moves forward and is recorded before anything is forgotten."""
        with self.lock:
            self._dirty |= set(self.histories)
            self.classify_dirty()
            moved = {a: t for a, t in self.keep_from.items() if t > self.cut.get(a, float("-inf"))}
            if not moved:
                return
            try:
                with self.store.tx(lead=True) as db:
                    db.executemany("UPDATE agents SET horizon = ? WHERE agent = ?",
                                   [(t, a) for a, t in moved.items()])
            except LostLead:  # another collector classifies now: it keeps the horizons
                return
            for agent, t in moved.items():
                self.cut[agent] = t
                hist = self.histories.get(agent)
                if hist is not None and hist.prune(t, self.pinned.get(agent, ())):
                    self._dirty.add(agent)

    def clock_str(self, agent: str) -> str | None:
        t = self.clocks.get(agent)
        return None if t is None else format_epoch(t)


def _day_end(day: str | None) -> float | None:
    """The end of a ``YYYY-MM-DD`` day (UTC), or None."""
    try:
        return ts_seconds(f"{day}T00:00:00Z") + 86400 if day else None
    except ProtocolError:
        return None



def _floor_ts(t: float) -> str:
    """An RFC 3339 bound a second before ``t``, for a coarse SQL filter (stored ts vary in precision)."""
    try:
        return format_epoch(max(t - 1, 0.0))  # 1970-01-01: no valid ts is older (a reset clock is a clock)
    except (ValueError, OverflowError):
        return "0000"

