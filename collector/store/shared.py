"""What the SQLite and PostgreSQL stores do the same way, in SQL both accept.

Each store supplies its connection (``tx`` yields it), ``_boot_id`` (the small integer that stands for
an agent's boot), ``_insert_seen`` (a batch of dedup rows in one statement) with the error a duplicate
raises (``_DUPLICATE``), and ``_alive`` (whether its transaction can still be rolled back to a savepoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

RESOLUTIONS = {300: "5m", 3600: "1h"}
HOST_METRICS = ("cpu_pct", "mem_pct", "disk_pct", "uptime_s", "temp_c")
DEVICE_METRICS = ("present", "in_use", "errors_total", "resets_total", "speed_rank")
_WIDE = (("host_samples", "'_host'", HOST_METRICS), ("device_samples", "device", DEVICE_METRICS))


def dicts(cur: Any) -> list[dict[str, Any]]:
    """A cursor's rows as dicts by column name."""
    cols = [d[0] for d in cur.description or ()]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


class SharedStore:
    _DUPLICATE: type[Exception] | tuple[type[Exception], ...]
    _pending_ids: dict[tuple[str, str], int]

    def _boot_id(self, db: Any, agent: str, boot: str) -> int:
        raise NotImplementedError

    def _insert_seen(self, db: Any, rows: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def _alive(self, db: Any) -> bool:
        return bool(db.in_transaction)

    def query(self, sql: str, args: Any = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    @contextmanager
    def savepoint(self, db: Any, name: str = "one") -> Iterator[None]:
        """Inside ``tx``: undo just this part if it raises (one message of a batch)."""
        db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._pending_ids.clear()  # may name rows just undone; they are looked up again
            if self._alive(db):  # a full disk or a lost connection may have ended the transaction already
                db.execute(f"ROLLBACK TO SAVEPOINT {name}")
                db.execute(f"RELEASE SAVEPOINT {name}")
            raise
        db.execute(f"RELEASE SAVEPOINT {name}")

    def mark_seen(self, db: Any, agent: str, boot: str, seq: int) -> bool:
        """True the first time ``(agent, boot, seq)`` is seen (keyed by a small integer per boot)."""
        row = (self._boot_id(db, agent, boot), seq)
        return bool(db.execute("INSERT INTO seen VALUES (?, ?) ON CONFLICT DO NOTHING", row).rowcount == 1)

    def mark_seen_many(self, db: Any, keys: list[tuple[str, str, int]]) -> list[bool]:
        """``mark_seen`` for a whole batch: one statement for all of it (the database's unique key decides),
        and one per message only when the batch holds a message seen before (a redelivery), to tell which."""
        rows = [(self._boot_id(db, a, boot), seq) for a, boot, seq in keys]
        if not rows:
            return []
        try:
            with self.savepoint(db, "dedup"):
                self._insert_seen(db, rows)
        except self._DUPLICATE:
            return [db.execute("INSERT INTO seen VALUES (?, ?) ON CONFLICT DO NOTHING", r).rowcount == 1
                    for r in rows]
        return [True] * len(rows)

    def unmark_seen(self, db: Any, agent: str, boot: str, seq: int) -> None:
        """Undo ``mark_seen`` for a message that could not be stored after all."""
        db.execute("DELETE FROM seen WHERE boot_id = ? AND seq = ?", (self._boot_id(db, agent, boot), seq))

    @staticmethod
    def bump(db: Any, name: str, by: int = 1) -> None:
        db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = counters.value + ?",
                   (name, by, by))

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self.query("SELECT name, value FROM counters")}

    # ------------------------------------------------------------------ maintenance
    _ROLLUP: str  # one metric of one table into one resolution: the store's own SQL (see each store)
    retention: Any

    def tx(self, lead: bool = False) -> Any:
        raise NotImplementedError

    def roll_up_and_expire(self, now: float) -> None:
        """Fold raw samples into 5-minute and hourly buckets; drop what is past retention.

        Age is judged by receive time (``rx``), never by an agent's clock: a sample is rolled up
        once it was received, into the bucket of its own ``ts``, and kept for as long as samples
        received with it, whatever that agent's clock says. Every row has ``rx``: these read ranges of
        the rx indexes."""
        with self.tx() as db:
            for res in RESOLUTIONS:
                mark = db.execute("SELECT value FROM counters WHERE name = ?", (f"rollup_mark_{res}",)).fetchone()
                lo, hi = (mark[0] if mark else 0), now // res * res
                for table, device, metrics in _WIDE:
                    for metric in metrics:
                        db.execute(self._ROLLUP.format(table=table, device=device, metric=metric),
                                   (res, float(res), res, metric, lo, hi))
                db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                           (f"rollup_mark_{res}", int(hi)))
            raw = now - self.retention.raw_s
            db.execute("DELETE FROM host_samples WHERE rx < ?", (raw,))
            db.execute("DELETE FROM device_samples WHERE rx < ?", (raw,))
            db.execute("DELETE FROM rollup WHERE res = 300 AND rx < ?", (now - self.retention.five_min_s,))
            db.execute("DELETE FROM rollup WHERE res = 3600 AND rx < ?", (now - self.retention.hourly_s,))
