"""Append-only, hash-chained audit log of every incident decision.

Each entry's hash covers the previous entry's hash and its own content, so editing or
deleting any entry breaks every link after it; ``verify`` names the first broken one.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

GENESIS = "0" * 64


def _digest(prev: str, at: str, actor: str, incident: str | None, action: str, detail: str) -> str:
    body = json.dumps([prev, at, actor, incident, action, detail], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def append(db: sqlite3.Connection, at: str, actor: str, incident: str | None, action: str,
           detail: dict[str, Any]) -> str:
    row = db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    prev = row[0] if row else GENESIS
    d = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = _digest(prev, at, actor, incident, action, d)
    db.execute("INSERT INTO audit (at, actor, incident, action, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
               (at, actor, incident, action, d, prev, h))
    return h


def verify(db: sqlite3.Connection) -> tuple[int, int | None, str]:
    """(entries checked, id of the first broken entry or None, explanation)."""
    prev = GENESIS
    n = 0
    for rid, at, actor, incident, action, detail, prev_hash, h in db.execute(
        "SELECT id, at, actor, incident, action, detail, prev_hash, hash FROM audit ORDER BY id"
    ):
        n += 1
        if prev_hash != prev:
            return n, rid, f"entry {rid}: its link to the previous entry is broken (an entry was removed or altered)"
        if _digest(prev, at, actor, incident, action, detail) != h:
            return n, rid, f"entry {rid}: its content does not match its hash (it was altered)"
        prev = h
    return n, None, "chain intact"
