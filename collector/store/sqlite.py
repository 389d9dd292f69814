"""The embedded store: one SQLite file (WAL) for time series and the relational side.

Schema changes are numbered migrations applied in order from the first release on; the
file records which it has. Writes come in batches (one transaction per ingest batch).
Time series: raw samples, rolled up into 5-minute and hourly buckets, each with its own
retention (defaults: raw 14 days, 5-minute 90 days, hourly 2 years).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from collector.store.shared import SharedStore, dicts

MIGRATIONS: list[str] = [
    # 1: the first release
    """
    CREATE TABLE boots (id INTEGER PRIMARY KEY, agent TEXT NOT NULL, boot TEXT NOT NULL, UNIQUE (agent, boot));
    CREATE TABLE seen (boot_id INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (boot_id, seq)) WITHOUT ROWID;
    CREATE TABLE evidence (id INTEGER PRIMARY KEY, agent TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL,
                           ts TEXT NOT NULL, kind TEXT NOT NULL, type TEXT NOT NULL, device TEXT,
                           payload TEXT NOT NULL, received_at TEXT NOT NULL);
    CREATE INDEX evidence_agent ON evidence (agent, id);
    CREATE TABLE host_samples (ts REAL NOT NULL, agent TEXT NOT NULL, cpu_pct REAL, mem_pct REAL, disk_pct REAL,
                               uptime_s REAL, temp_c REAL);
    CREATE INDEX host_samples_series ON host_samples (agent, ts);
    CREATE TABLE device_samples (ts REAL NOT NULL, agent TEXT NOT NULL, device TEXT NOT NULL, present INTEGER,
                                 in_use INTEGER, errors_total REAL, resets_total REAL, speed_rank INTEGER);
    CREATE INDEX device_samples_series ON device_samples (agent, device, ts);
    CREATE TABLE rollup (res INTEGER NOT NULL, bucket INTEGER NOT NULL, agent TEXT NOT NULL, device TEXT NOT NULL,
                         metric TEXT NOT NULL, n INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL,
                         max REAL NOT NULL, PRIMARY KEY (res, agent, device, metric, bucket)) WITHOUT ROWID;
    CREATE TABLE agents (agent TEXT PRIMARY KEY, state TEXT, reason TEXT, boot TEXT, hostname TEXT, version TEXT,
                         platform TEXT, labels TEXT NOT NULL DEFAULT '{}', last_seen TEXT, inventory TEXT,
                         host TEXT, devices TEXT);
    CREATE TABLE dead_letter (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL, topic TEXT, reason TEXT NOT NULL,
                              detail TEXT NOT NULL, payload BLOB);
    CREATE TABLE incidents (id TEXT PRIMARY KEY, agent TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
                            status TEXT NOT NULL, cause TEXT NOT NULL, responsible TEXT NOT NULL,
                            confidence REAL NOT NULL, rule TEXT NOT NULL, opened_at TEXT NOT NULL,
                            resolved_at TEXT, evidence TEXT NOT NULL, summary TEXT NOT NULL,
                            decided_cause TEXT, decided_responsible TEXT, decided_by TEXT, decided_reason TEXT,
                            decided_at TEXT, acknowledged_by TEXT, acknowledged_at TEXT, updated_at TEXT NOT NULL);
    CREATE INDEX incidents_agent ON incidents (agent);
    CREATE TABLE audit (id INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, incident TEXT,
                        action TEXT NOT NULL, detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
    CREATE TABLE units (id TEXT PRIMARY KEY, name TEXT NOT NULL, pic_name TEXT, pic_email TEXT, pic_phone TEXT);
    CREATE TABLE rooms (id TEXT PRIMARY KEY, unit TEXT NOT NULL, name TEXT NOT NULL, agent TEXT);
    CREATE TABLE loans (device TEXT PRIMARY KEY, unit TEXT NOT NULL, room TEXT, lease_start TEXT, lease_end TEXT,
                        condition TEXT, note TEXT);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # 2: incident summaries in every interface language
    """
    ALTER TABLE incidents ADD COLUMN summaries TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: policy 1.1: the policy version on every incident; each agent's own clock and clock offset
    """
    ALTER TABLE incidents ADD COLUMN policy TEXT NOT NULL DEFAULT '1';
    ALTER TABLE agents ADD COLUMN clock TEXT;
    ALTER TABLE agents ADD COLUMN clock_offset_s REAL;
    ALTER TABLE agents ADD COLUMN horizon REAL;
    ALTER TABLE incidents ADD COLUMN needs_from REAL;
    ALTER TABLE evidence ADD COLUMN flag TEXT;
    ALTER TABLE host_samples ADD COLUMN rx REAL;
    ALTER TABLE device_samples ADD COLUMN rx REAL;
    ALTER TABLE rollup ADD COLUMN rx REAL;
    CREATE INDEX host_samples_rx ON host_samples (rx);
    CREATE INDEX device_samples_rx ON device_samples (rx);
    """,
    # 4: accounts and roles, sessions, API and one-time sign-in tokens (hashes only), failed logins;
    # loans remember whether the registry file or a person (through the API) last set them
    """
    CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT NOT NULL, unit TEXT, password TEXT,
                        disabled INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
    CREATE TABLE sessions (id TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL, created_at REAL NOT NULL,
                           expires_at REAL NOT NULL);
    CREATE INDEX sessions_user ON sessions (user);
    CREATE TABLE tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL, kind TEXT NOT NULL, label TEXT,
                         created_at REAL NOT NULL, expires_at REAL, last_used REAL);
    CREATE INDEX tokens_user ON tokens (user);
    CREATE TABLE login_failures (at REAL NOT NULL, username TEXT NOT NULL, remote TEXT NOT NULL);
    CREATE INDEX login_failures_at ON login_failures (at);
    ALTER TABLE loans ADD COLUMN source TEXT NOT NULL DEFAULT 'file';
    ALTER TABLE loans ADD COLUMN updated_by TEXT;
    ALTER TABLE loans ADD COLUMN updated_at TEXT;
    """,
    # 5: indexes for the dashboard's reads: incident lists by time, status and device, the change feed,
    # an incident's audit trail and evidence, a device's evidence, recent detaches, rooms by room PC
    """
    CREATE INDEX incidents_opened ON incidents (opened_at);
    CREATE INDEX incidents_status ON incidents (status, opened_at);
    CREATE INDEX incidents_updated ON incidents (updated_at);
    CREATE INDEX incidents_device ON incidents (device, opened_at);
    CREATE INDEX audit_incident ON audit (incident, id);
    CREATE INDEX evidence_device ON evidence (device, id);
    CREATE INDEX evidence_ref ON evidence (agent, boot, seq);
    CREATE INDEX evidence_type ON evidence (type, received_at);
    CREATE INDEX rooms_agent ON rooms (agent);
    """,
    # 6: enrollment tokens (hashes only), the broker accounts of enrolled room PCs, a loan's recorded
    # return, and the loan-out and return snapshots of lent devices
    """
    CREATE TABLE enroll_tokens (id TEXT PRIMARY KEY, unit TEXT NOT NULL, room TEXT NOT NULL, agent TEXT NOT NULL,
                                created_by TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
                                used_at REAL, used_from TEXT);
    CREATE TABLE agent_accounts (agent TEXT PRIMARY KEY, unit TEXT NOT NULL, room TEXT NOT NULL,
                                 enrolled_at TEXT NOT NULL, enrolled_from TEXT, disabled_at TEXT, disabled_by TEXT,
                                 disabled_reason TEXT);
    ALTER TABLE loans ADD COLUMN returned_at TEXT;
    CREATE TABLE loan_snapshots (device TEXT NOT NULL, kind TEXT NOT NULL, lease_start TEXT NOT NULL DEFAULT '',
                                 taken_at TEXT NOT NULL, agent TEXT, room TEXT, data TEXT NOT NULL,
                                 PRIMARY KEY (device, kind, lease_start));
    """,
    # 7: each boot's latest ts (seconds), over every message of it: when a boot ended, for windows
    # carried across a stop (telemetry that is not evidence moves it too)
    """
    ALTER TABLE boots ADD COLUMN last_ts REAL;
    """,
    # 8: every sample and roll-up has its receive time (rows from before 3 take their own time), so
    # housekeeping reads a range of the rx indexes instead of scanning the raw tables
    """
    UPDATE host_samples SET rx = ts WHERE rx IS NULL;
    UPDATE device_samples SET rx = ts WHERE rx IS NULL;
    UPDATE rollup SET rx = bucket WHERE rx IS NULL;
    """,
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Retention:
    raw_s: float = 14 * 86400
    five_min_s: float = 90 * 86400
    hourly_s: float = 730 * 86400


class StoreError(RuntimeError):
    """The store cannot be opened: one line saying which file and why."""


class LostLead(RuntimeError):
    """A classifying write refused: this collector no longer holds the lead (another one classifies)."""


class SqliteStore(SharedStore):
    def __init__(self, path: str, retention: Retention | None = None) -> None:
        self.path = path
        self.retention = retention or Retention()
        self.lock = threading.RLock()
        self.created_empty = os.path.exists(path) and os.path.getsize(path) == 0
        if self.created_empty:
            log.warning("store: %s is an empty file; a new database is created in it", path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a batch acknowledged to the broker after COMMIT survives a power loss too
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(f"store: cannot open {path}: {exc} (not a Pantau database, damaged or unreadable; "
                             "restore it from a backup or move it away)") from None
        self._boot_ids: dict[tuple[str, str], int] = {}  # committed rows only
        self._pending_ids: dict[tuple[str, str], int] = {}  # created in the open transaction
        try:
            self.migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store: cannot migrate {path}: {exc}") from None

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self.lock:
            v = self.schema_version()
            if v > len(MIGRATIONS):
                raise StoreError(f"store: {self.path} has schema {v}, newer than this collector "
                                 f"({len(MIGRATIONS)}): upgrade the collector, or restore a backup")
            for n in range(v, len(MIGRATIONS)):
                self.db.executescript(f"BEGIN; {MIGRATIONS[n]}; PRAGMA user_version = {n + 1}; COMMIT;")

    @contextmanager
    def tx(self, lead: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction; COMMIT inside it, so a commit that fails (a full disk) rolls back too.

        ``lead``: a classifying write, which only the leading collector may make — on SQLite, always
        this one (one collector per file)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self._pending_ids.clear()  # ids handed out in this transaction are gone with it
                raise
            self._boot_ids.update(self._pending_ids)
            self._pending_ids.clear()

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self.lock:
            return dicts(self.db.execute(sql, tuple(args)))

    # ------------------------------------------------------------------ ingest side
    def _boot_id(self, db: sqlite3.Connection, agent: str, boot: str) -> int:
        """The small integer that stands for ``(agent, boot)`` in the dedup table."""
        ident = (agent, boot)
        bid = self._boot_ids.get(ident) or self._pending_ids.get(ident)
        if bid is None:
            db.execute("INSERT OR IGNORE INTO boots (agent, boot) VALUES (?, ?)", ident)
            bid = int(db.execute("SELECT id FROM boots WHERE agent = ? AND boot = ?", ident).fetchone()[0])
            if len(self._boot_ids) > 100_000:
                self._boot_ids.clear()
            self._pending_ids[ident] = bid
        return bid

    _DUPLICATE = sqlite3.IntegrityError

    @staticmethod
    def _insert_seen(db: sqlite3.Connection, rows: list[tuple[int, int]]) -> None:
        db.executemany("INSERT INTO seen VALUES (?, ?)", rows)

    @staticmethod
    def add_samples(db: sqlite3.Connection, host: list[tuple[Any, ...]], devices: list[tuple[Any, ...]]) -> None:
        """Wide rows: one per telemetry message for the host, one per device; each ends with its
        receive time (``rx``), by which housekeeping judges age."""
        if host:
            db.executemany("INSERT INTO host_samples (ts, agent, cpu_pct, mem_pct, disk_pct, uptime_s, temp_c, rx) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", host)
        if devices:
            db.executemany("INSERT INTO device_samples (ts, agent, device, present, in_use, errors_total, "
                           "resets_total, speed_rank, rx) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", devices)

    # ------------------------------------------------------------------ maintenance
    # SharedStore.roll_up_and_expire, in SQLite: the bucket of a sample's ts, its upsert
    _ROLLUP = """INSERT INTO rollup (res, bucket, agent, device, metric, n, sum, min, max, rx)
                 SELECT ?, CAST(ts / ? AS INTEGER) * ?, agent, {device}, ?, count({metric}),
                        sum({metric}), min({metric}), max({metric}), max(rx)
                 FROM {table} WHERE rx >= ? AND rx < ? AND {metric} IS NOT NULL
                 GROUP BY 2, agent, {device}
                 ON CONFLICT (res, agent, device, metric, bucket) DO UPDATE SET
                   n = n + excluded.n, sum = sum + excluded.sum,
                   min = min(min, excluded.min), max = max(max, excluded.max),
                   rx = max(coalesce(rx, 0), excluded.rx)"""

    def close(self) -> None:
        with self.lock:
            self.db.close()


def dumps(obj: Any) -> str:
    """Compact JSON that never carries NaN or Infinity (ValueError instead)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
