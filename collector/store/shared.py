"""What the SQLite and PostgreSQL stores do the same way, in SQL both accept.

Each store supplies its connection (``tx`` yields it), ``_boot_id`` (the small integer that stands for
an agent's boot), ``_insert_seen`` (a batch of dedup rows in one statement) with the error a duplicate
raises (``_DUPLICATE``), and ``_alive`` (whether its transaction can still be rolled back to a savepoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self.query("SELECT name, value FROM counters")}
