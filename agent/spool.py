"""The durable outbox: every QoS 1 message is committed here before it is published and
deleted only after the broker acknowledged it.

SQLite in WAL mode with ``synchronous=FULL``: a committed message survives ``kill -9`` and
power loss. Events are bounded by count and bytes; on overflow the *oldest* events are dropped (the
newest evidence matters most for a liability decision), and every drop is counted
durably and reported in ``state`` and telemetry — never silently. Retained messages
(``state``, ``inventory``) do not count against the bound: a newer one replaces an older
unsent one of the same topic, since the broker would keep only the last anyway.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    def __init__(self, path: str, max_events: int = 100_000, max_bytes: int = 100 * 1024 * 1024) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                qos INTEGER NOT NULL, retain INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
            """
        )
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE retain = 0").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])  # events only: what the bound applies to

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if retain:
                    self._db.execute("DELETE FROM outbox WHERE retain = 1 AND topic = ?", (topic,))
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                    (topic, payload, qos, int(retain)),
                )
                if not retain:
                    self._count += 1
                    self._bytes += len(payload)
                dropped = 0
                while self._count > self.max_events or self._bytes > self.max_bytes:
                    old = self._db.execute(
                        "SELECT id, length(payload) FROM outbox WHERE retain = 0 ORDER BY id LIMIT 1").fetchone()
                    if old is None or old[0] == cur.lastrowid:
                        break
                    self._db.execute("DELETE FROM outbox WHERE id = ?", (old[0],))
                    self._count -= 1
                    self._bytes -= int(old[1])
                    dropped += 1
                if dropped:
                    self._db.execute(
                        "INSERT INTO meta (k, v) VALUES ('dropped_total', ?) "
                        "ON CONFLICT(k) DO UPDATE SET v = v + excluded.v", (dropped,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0)

    def pending(self, after_id: int = 0, limit: int = 500) -> list[Row]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def ack(self, row_id: int) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE id = ? RETURNING length(payload), retain", (row_id,))
            r = cur.fetchone()
            if r is not None and not r[1]:
                self._count -= 1
                self._bytes -= int(r[0])

    @property
    def depth(self) -> int:
        """Events waiting (retained state/inventory rows not included)."""
        return self._count

    @property
    def empty(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is None

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def dropped_total(self) -> int:
        with self._lock:
            r = self._db.execute("SELECT v FROM meta WHERE k = 'dropped_total'").fetchone()
        return int(r[0]) if r else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
