"""Reading for the web side: read-only connections of its own, JSON that can never hold NaN, and the
rows each user may see (a PIC: only their unit's rooms, devices and incidents)."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse

from collector.registry import lookup
from collector.users import User

CLOCK_SUSPECT_S = 120.0


class Reader:
    """``query`` like SqliteStore's, on a read-only connection per thread: WAL readers never wait for
    the store's lock or an ingest batch, and never make one wait."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.path = getattr(store, "path", "")
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection | None:
        if not self.path or self.path == ":memory:":
            return None
        db = getattr(self._local, "db", None)
        if db is None:
            uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            self._local.db = db
        return db

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        if getattr(self.store, "dialect", "sqlite") != "sqlite":  # a server: connections of its own per thread
            return list(self.store.read(sql, args))
        db = self._db()
        if db is None:
            return list(self.store.query(sql, args))
        cur = db.execute(sql, tuple(args))
        cols = [d[0] for d in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def clean(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


class SafeJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(clean(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def agent_unit(r: Reader, agent: str, labels: dict[str, Any] | None) -> str | None:
    """The unit whose registered room this PC is in, else the unit it says it is in."""
    rows = r.query("SELECT unit FROM rooms WHERE agent = ?", (agent,))
    if rows:
        return str(rows[0]["unit"])
    unit = (labels or {}).get("unit")
    return unit if isinstance(unit, str) else None


def agent_view(r: Reader, row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for k in ("labels", "inventory", "host", "devices"):
        out[k] = _loads(row.get(k), None)
    out["unit"] = agent_unit(r, row["agent"], out["labels"] if isinstance(out["labels"], dict) else None)
    off = row.get("clock_offset_s")
    out["clock_suspect"] = isinstance(off, int | float) and math.isfinite(off) and abs(off) > CLOCK_SUSPECT_S
    return out


def incident_view(r: Reader, row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["evidence"] = _loads(row["evidence"], [])
    out["summaries"] = _loads(row.get("summaries"), {})
    out["registry"] = lookup(r, row["device"], row["agent"])
    out["effective_cause"] = row["decided_cause"] or row["cause"]
    out["effective_responsible"] = row["decided_responsible"] or row["responsible"]
    return out


def sees_unit(user: User, unit: str | None) -> bool:
    return not user.scoped or (unit is not None and unit == user.unit)


def visible_incident(r: Reader, user: User, incident_id: str) -> dict[str, Any] | None:
    rows = r.query("SELECT * FROM incidents WHERE id = ?", (incident_id,))
    if not rows:
        return None
    view = incident_view(r, rows[0])
    return view if sees_unit(user, view["registry"]["unit"]) else None


class WebState:
    """Everything a request handler needs, on ``app.state.pantau``."""

    def __init__(self, collector: Any, settings: Any, health: Any) -> None:
        self.collector = collector
        self.store = collector.store
        self.reader = Reader(collector.store)
        self.settings = settings
        self.health = health
        self.verify_lock = threading.Lock()
        from collector.web.feed import ChangeFeed

        self.feed = ChangeFeed(self.reader)
        self.closing = threading.Event()

    @property
    def windows(self) -> Any:
        """The classifier's policy windows (defaults where this process classifies nothing)."""
        from collector.policy import Windows

        classifier = getattr(self.collector, "classifier", None)
        return getattr(classifier, "windows", None) or Windows()

    def close(self) -> None:
        self.closing.set()
        self.feed.close()
