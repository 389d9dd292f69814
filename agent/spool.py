"""The durable outbox: every QoS 1 message is committed here before it is published and
deleted only after the broker acknowledged it.

SQLite in WAL mode with ``synchronous=FULL``: a committed message survives ``kill -9`` and
power loss. Events are bounded by count and bytes; on overflow the *oldest* events are dropped (the
newest evidence matters most for a liability decision), and every drop is counted
durably and reported in ``state`` and telemetry — never silently. Retained messages
(``state``, ``inventory``) do not count against the bound: a newer one replaces an older
unsent one of the same topic, since the broker would keep only the last anyway.

When the disk refuses a write (full, read-only, I/O error), messages wait in memory, in order and
with the row ids they will keep on disk, and are published from there while the broker is up. The
disk is tried again on every ``put`` and every ``retry()`` (the agent calls it each tick). Memory is
bounded too: past it the oldest event that is not marked ``keep`` (the agent marks
``device.detached``) is dropped and counted, and the count reaches the disk with the backlog.

A ``token`` (a handling report's id) is stored in the same transaction as its row, so whoever
handed the message over can tell afterwards that it is safely queued (``token_state``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)
DISK_ERRORS = (sqlite3.Error, OSError)


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class _Held:
    """A message not on disk yet."""

    row: Row
    keep: bool
    token: str | None


def _open(path: str, exclusive: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        if exclusive:  # WAL without the -shm file (its index in this process's memory)
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                qos INTEGER NOT NULL, retain INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY);
            """
        )
        db.execute("SELECT count(*) FROM outbox").fetchone()
    except sqlite3.Error:
        db.close()
        raise
    return db


class Outbox:
    def __init__(self, path: str, max_events: int = 100_000, max_bytes: int = 100 * 1024 * 1024,
                 mem_max_events: int | None = None, mem_max_bytes: int | None = None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.mem_max_events = mem_max_events or min(max_events, 10_000)
        self.mem_max_bytes = mem_max_bytes or min(max_bytes, 16 * 1024 * 1024)
        self._lock = threading.Lock()
        self.disk_error: str | None = None
        try:
            self._db = _open(path, exclusive=False)
        except sqlite3.Error as exc:  # a full disk: WAL's shared-memory file cannot be made
            log.warning("outbox %s: %s; opened without its shared-memory file (exclusive locking)", path, exc)
            try:
                self._db = _open(path, exclusive=True)
            except sqlite3.Error as exc2:  # not even that (a first start on a full disk): memory, not a stop
                self.disk_error = f"the outbox {path} cannot be opened: {exc2}"
                log.error("%s; events are kept in memory only, until the agent is started with room on its "
                          "disk (they are lost if it stops before)", self.disk_error)
                self._db = _open(":memory:", exclusive=False)
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE retain = 0").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])  # events on disk: what the bound applies to
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        top = self._db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
        self._last_id = max(int(seq[0]) if seq else 0, int(top[0]))
        self._held: list[_Held] = []  # waiting for the disk, in id order
        self._held_dropped = 0  # drops from memory not yet counted on disk
        self._acked_tokens: set[str] = set()  # tokens of held rows delivered before reaching the disk
        self._undeleted: set[int] = set()  # acknowledged rows whose DELETE the disk refused

    # ------------------------------------------------------------------ writing
    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, keep: bool = False,
            token: str | None = None) -> int:
        """Queue a message; returns its row id. Never raises for a disk that refuses the write."""
        with self._lock:
            self._last_id += 1
            row = Row(self._last_id, topic, payload, qos, retain)
            if retain:  # the broker keeps only the newest retained message of a topic
                self._held = [h for h in self._held if not (h.row.retain and h.row.topic == topic)]
            self._held.append(_Held(row, keep, token))
            self._flush()
            return row.id

    def retry(self) -> bool:
        """Try the disk again for whatever waits in memory; True when nothing waits any more."""
        with self._lock:
            if self._undeleted:
                self._delete_undeleted()
            if self._held or self._held_dropped:  # a drop count waits for the disk too
                self._flush()
            return not self._held and not self._undeleted and not self._held_dropped

    def _flush(self) -> None:
        """Write every held row to disk in one transaction, or keep them all (bounded) in memory."""
        try:
            try:
                self._write(self._held)
            except sqlite3.IntegrityError:  # another writer took our ids: renumber what is not on disk yet
                self._renumber()
                self._write(self._held)
        except DISK_ERRORS as exc:
            if self.disk_error is None:
                log.warning("outbox %s: the disk refused a write (%s); keeping messages in memory and "
                            "retrying every tick", self.path, exc)
            self.disk_error = str(exc)
            self._bound_memory()
            return
        if self.disk_error is not None:
            log.warning("outbox %s: the disk takes writes again; %d held messages are on disk",
                        self.path, len(self._held))
        self.disk_error = None
        self._held = []
        self._held_dropped = 0

    def _write(self, held: list[_Held]) -> None:
        db = self._db
        count, size = self._count, self._bytes
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped = self._held_dropped
            for h in held:
                r = h.row
                if r.retain:
                    db.execute("DELETE FROM outbox WHERE retain = 1 AND topic = ? AND id < ?", (r.topic, r.id))
                db.execute("INSERT INTO outbox (id, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                           (r.id, r.topic, r.payload, r.qos, int(r.retain)))
                if h.token is not None:
                    db.execute("INSERT OR IGNORE INTO tokens (token) VALUES (?)", (h.token,))
                if not r.retain:
                    count += 1
                    size += len(r.payload)
                while count > self.max_events or size > self.max_bytes:
                    old = db.execute(
                        "SELECT id, length(payload) FROM outbox WHERE retain = 0 ORDER BY id LIMIT 1").fetchone()
                    if old is None or old[0] == r.id:
                        break
                    db.execute("DELETE FROM outbox WHERE id = ?", (old[0],))
                    count -= 1
                    size -= int(old[1])
                    dropped += 1
            if dropped:
                db.execute("INSERT INTO meta (k, v) VALUES ('dropped_total', ?) "
                           "ON CONFLICT(k) DO UPDATE SET v = v + excluded.v", (dropped,))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._count, self._bytes = count, size

    def _renumber(self) -> None:
        top = int(self._db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
        log.error("outbox %s: another process wrote to it; renumbering %d waiting messages", self.path,
                  len(self._held))
        self._last_id = max(self._last_id, top)
        renumbered = []
        for h in self._held:
            self._last_id += 1
            r = h.row
            renumbered.append(_Held(Row(self._last_id, r.topic, r.payload, r.qos, r.retain), h.keep, h.token))
        self._held = renumbered

    def _bound_memory(self) -> None:
        """Past the memory bound, drop the oldest events not marked keep, and count them."""
        while True:
            events = [h for h in self._held if not h.row.retain]
            if (len(events) <= self.mem_max_events
                    and sum(len(h.row.payload) for h in events) <= self.mem_max_bytes):
                return
            victim = next((h for h in events if not h.keep and h is not events[-1]), None)
            if victim is None:
                return  # only kept events (or the newest event: a retained state is none) left: they stay
            self._held.remove(victim)
            self._held_dropped += 1
            log.warning("outbox %s: memory bound reached while the disk refuses writes; dropped one event "
                        "(%d dropped so far)", self.path, self._held_dropped)

    # ------------------------------------------------------------------ reading and acknowledging
    def pending(self, after_id: int = 0, limit: int = 500) -> list[Row]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit + len(self._undeleted))).fetchall()
            out = [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows if r[0] not in self._undeleted]
            out += [h.row for h in self._held if h.row.id > after_id]
        return sorted(out, key=lambda r: r.id)[:limit]

    def ack(self, row_id: int) -> None:
        """The broker has it. Never raises: a DELETE the disk refuses is retried by ``retry()``."""
        with self._lock:
            for h in self._held:
                if h.row.id == row_id:
                    self._held.remove(h)
                    if h.token is not None:
                        self._acked_tokens.add(h.token)
                    return
            try:
                self._delete(row_id)
            except DISK_ERRORS as exc:
                log.debug("outbox: deleting acknowledged row %d failed (%s); retried later", row_id, exc)
                self._undeleted.add(row_id)

    def _delete(self, row_id: int) -> None:
        cur = self._db.execute("DELETE FROM outbox WHERE id = ? RETURNING length(payload), retain", (row_id,))
        r = cur.fetchone()
        cur.close()
        if r is not None and not r[1]:
            self._count -= 1
            self._bytes -= int(r[0])

    def _delete_undeleted(self) -> None:
        for row_id in sorted(self._undeleted):
            try:
                self._delete(row_id)
            except DISK_ERRORS:
                _rollback(self._db)
                return
            self._undeleted.discard(row_id)

    # ------------------------------------------------------------------ tokens
    def token_state(self, token: str) -> str | None:
        """``"queued"`` once the message carrying ``token`` is safely on disk or delivered,
        ``"held"`` while it waits in memory, None if no message carries it."""
        with self._lock:
            if token in self._acked_tokens:
                return "queued"
            if any(h.token == token for h in self._held):
                return "held"
            r = self._db.execute("SELECT 1 FROM tokens WHERE token = ?", (token,)).fetchone()
        return "queued" if r else None

    def forget_token(self, token: str) -> None:
        """The token's owner has cleaned up; a refused DELETE leaves a harmless row."""
        with self._lock:
            self._acked_tokens.discard(token)
            try:
                self._db.execute("DELETE FROM tokens WHERE token = ?", (token,))
            except DISK_ERRORS as exc:
                _rollback(self._db)
                log.debug("outbox: forgetting token failed: %s", exc)

    def tokens(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT token FROM tokens")} | set(self._acked_tokens)

    # ------------------------------------------------------------------ gauges
    @property
    def depth(self) -> int:
        """Events waiting, on disk and in memory (retained state/inventory rows not included)."""
        return self._count - len(self._undeleted) + sum(1 for h in self._held if not h.row.retain)

    @property
    def held(self) -> int:
        """Messages waiting in memory for the disk."""
        return len(self._held)

    @property
    def empty(self) -> bool:
        with self._lock:
            if self._held:
                return False
            rows = self._db.execute("SELECT id FROM outbox LIMIT ?", (len(self._undeleted) + 1,)).fetchall()
        return all(r[0] in self._undeleted for r in rows)

    @property
    def size_bytes(self) -> int:
        return self._bytes + sum(len(h.row.payload) for h in self._held if not h.row.retain)

    @property
    def dropped_total(self) -> int:
        with self._lock:
            r = self._db.execute("SELECT v FROM meta WHERE k = 'dropped_total'").fetchone()
            return (int(r[0]) if r else 0) + self._held_dropped

    def close(self) -> None:
        with self._lock:
            if self._held:
                self._flush()
            if self._held:
                log.error("outbox %s: closing with %d messages the disk would not take; they are lost "
                          "(%d dropped before)", self.path, len(self._held), self._held_dropped)
            self._db.close()


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite already rolled back (a full disk does that), or nothing was open
