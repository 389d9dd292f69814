"""What the dashboard reads, in SQL: incident lists filtered, sorted and paginated in the database,
counts, one incident with its stored evidence, and the time series from the store's rollups.

The web side reads through this module (and ``fleet.py`` for what is in each room now), never with
SQL of its own. Every function takes a ``Queryable`` (the store, or the web side's read-only reader)
and, where a list is scoped, the unit it is limited to.

An incident's unit and room follow ``registry.lookup``: the loan of its device (by key, else by
serial), else the registered room of the PC that saw it, else the labels that PC reports.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from collector.registry import Queryable
from common.protocol import ProtocolError, format_epoch, ts_seconds

MAX_LIMIT = 500
DEFAULT_LIMIT = 50

# An incident with where it belongs, in SQL. The serial of a key vid:pid:serial starts at character 11.
# A subquery in FROM is always given a name here: PostgreSQL before 16 requires one.
PLACED_SQL = """
SELECT i.id, i.agent, i.device, i.kind, i.status, i.cause, i.responsible, i.confidence, i.rule, i.policy,
       i.opened_at, i.resolved_at, i.summary, i.summaries, i.decided_cause, i.decided_responsible, i.decided_by,
       i.decided_at, i.decided_reason, i.acknowledged_by, i.acknowledged_at, i.updated_at,
       coalesce(i.decided_cause, i.cause) AS effective_cause,
       coalesce(i.decided_responsible, i.responsible) AS effective_responsible,
       (l1.device IS NOT NULL OR l2.device IS NOT NULL) AS registered,
       coalesce(l1.unit, l2.unit, (SELECT r.unit FROM rooms r WHERE r.agent = i.agent LIMIT 1),
                CASE WHEN json_valid(ag.labels) THEN json_extract(ag.labels, '$.unit') END) AS unit,
       coalesce(l1.room, l2.room, (SELECT r.id FROM rooms r WHERE r.agent = i.agent LIMIT 1),
                CASE WHEN json_valid(ag.labels) THEN json_extract(ag.labels, '$.room') END) AS room
FROM incidents i
LEFT JOIN loans l1 ON l1.device = i.device
LEFT JOIN loans l2 ON substr(i.device, 10, 1) = ':' AND l2.device = substr(i.device, 11)
LEFT JOIN agents ag ON ag.agent = i.agent
"""
_NAMED = f"""
SELECT p.*, u.name AS unit_name, u.pic_name AS pic_name, rm.name AS room_name
FROM ({PLACED_SQL}) p LEFT JOIN units u ON u.id = p.unit LEFT JOIN rooms rm ON rm.id = p.room
"""
_PLAIN = """SELECT *, coalesce(decided_cause, cause) AS effective_cause,
                  coalesce(decided_responsible, responsible) AS effective_responsible FROM incidents"""
SORTS = {"opened_at": "opened_at", "resolved_at": "resolved_at", "kind": "kind", "status": "status",
         "cause": "effective_cause", "responsible": "effective_responsible", "unit": "unit_name", "room": "room_name",
         "device": "device", "agent": "agent", "rule": "rule"}
STATUSES = ("open", "resolved", "withdrawn")


class QueryError(ValueError):
    """A query parameter that cannot be used: one line saying which and why."""


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ZONED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?[+-]\d{2}:\d{2}$")


def parse_time(value: str | None, name: str) -> str | None:
    """An RFC 3339 time (with its zone: ``Z`` or ``±hh:mm``) or a date (``YYYY-MM-DD``, midnight UTC) as the
    store writes times, or None. A time without a zone is refused: it would mean the server's local time."""
    if value is None or value == "":
        return None
    v = value.strip()
    try:
        if _DATE.match(v):
            t = datetime.strptime(v, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        elif v.endswith("Z"):
            t = ts_seconds(v)
        else:
            if not _ZONED.match(v):
                raise ValueError
            t = datetime.fromisoformat(v).timestamp()
    except (ValueError, ProtocolError, OverflowError):
        raise QueryError(f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD) or an RFC 3339 time with its zone "
                         "(Z or +07:00)") from None
    if not 946684800 <= t <= 4102444800:
        raise QueryError(f"{name}: {value[:40]!r} is outside 2000-2100")
    return format_epoch(t)


def epoch(value: str | None, name: str) -> float | None:
    t = parse_time(value, name)
    return None if t is None else ts_seconds(t)


@dataclass
class IncidentQuery:
    unit: str | None = None
    status: str | None = None  # open, resolved, withdrawn, all; None: all but withdrawn
    cause: str | None = None
    responsible: str | None = None
    kind: str | None = None
    model: str | None = None  # vid:pid
    agent: str | None = None
    device: str | None = None
    q: str | None = None
    since: str | None = None
    until: str | None = None
    sort: str = "opened_at"
    order: str = "desc"
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    def where(self) -> tuple[str, list[Any]]:
        sql, args = ["1=1"], []
        if self.status in (None, ""):
            sql.append("status != 'withdrawn'")
        elif self.status != "all":
            if self.status not in STATUSES:
                raise QueryError(f"status: must be one of {', '.join(STATUSES)} or all")
            sql.append("status = ?")
            args.append(self.status)
        for col, v in (("unit", self.unit), ("effective_cause", self.cause),
                       ("effective_responsible", self.responsible), ("kind", self.kind), ("agent", self.agent),
                       ("device", self.device)):
            if v:
                sql.append(f"{col} = ?")
                args.append(v)
        if self.model:
            sql.append("substr(device, 1, 9) = ?")
            args.append(self.model.lower()[:9])
        since, until = parse_time(self.since, "since"), parse_time(self.until, "until")
        if since:
            sql.append("opened_at >= ?")
            args.append(since)
        if until:
            sql.append("opened_at < ?")
            args.append(until)
        if self.q and self.q.strip():
            # the incident's own text, or the room PC or device of a room, unit or PIC whose names match
            needle = self.q.strip().lower()[:100]
            own = " OR ".join(f"instr(lower({c}), ?) > 0" for c in ("device", "agent", "summary", "id"))
            named = ("SELECT id FROM units WHERE instr(lower(id), ?) > 0 OR instr(lower(name), ?) > 0 "
                     "OR instr(lower(coalesce(pic_name, '')), ?) > 0")
            rooms = "SELECT id FROM rooms WHERE instr(lower(id), ?) > 0 OR instr(lower(name), ?) > 0"
            lent = f"SELECT device FROM loans WHERE unit IN ({named}) OR room IN ({rooms})"
            sql.append(f"({own} OR agent IN (SELECT agent FROM rooms WHERE unit IN ({named}) OR id IN ({rooms})) "
                       f"OR device IN ({lent}) OR substr(device, 11) IN ({lent}))")
            args += [needle] * (4 + 5 + 5 + 5)
        return " AND ".join(sql), args

    def order_by(self) -> str:
        col = SORTS.get(self.sort)
        if col is None:
            raise QueryError(f"sort: must be one of {', '.join(SORTS)}")
        if self.order not in ("asc", "desc"):
            raise QueryError("order: must be asc or desc")
        way = self.order.upper()
        # ties broken by id, so that pages never overlap or skip (PostgreSQL keeps no insertion order);
        # a missing value last either way (SQLite would sort NULL first ascending, PostgreSQL last)
        if col == "opened_at":  # the index's order: no sort of every match
            return f"opened_at {way}, id {way}"
        return f"{col} IS NULL, {col} {way}, opened_at {way}, id {way}"


def incident_page(r: Queryable, q: IncidentQuery) -> tuple[list[dict[str, Any]], int]:
    """(one page of incidents, how many match in all)."""
    if not 1 <= q.limit <= MAX_LIMIT:
        raise QueryError(f"limit: must be 1-{MAX_LIMIT}")
    if q.offset < 0:
        raise QueryError("offset: must be 0 or more")
    where, args = q.where()
    base = f"SELECT * FROM ({_NAMED}) n WHERE {where}"
    # counting needs where an incident belongs only when the unit filter asks for it
    plain = f"SELECT * FROM ({_PLAIN}) i WHERE {where}" if not q.unit else base
    total = int(r.query(f"SELECT count(*) AS n FROM ({plain}) m", args)[0]["n"])
    rows = r.query(f"{base} ORDER BY {q.order_by()} LIMIT ? OFFSET ?", [*args, q.limit, q.offset])
    return [incident_row(x) for x in rows], total


def incident_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["registered"] = bool(row.get("registered"))
    try:
        out["summaries"] = json.loads(row.get("summaries") or "{}")
    except ValueError:
        out["summaries"] = {}
    return out


def placed_incident(r: Queryable, incident_id: str) -> dict[str, Any] | None:
    rows = r.query(f"SELECT * FROM ({_NAMED}) n WHERE id = ?", (incident_id,))
    return incident_row(rows[0]) if rows else None


def incident_counts(r: Queryable, unit: str | None) -> dict[str, Any]:
    """Open incidents by cause, by responsible party and by kind (effective: a decision wins)."""
    where, args = ("AND unit = ?", [unit]) if unit else ("", [])
    rows = r.query(f"SELECT effective_cause AS cause, effective_responsible AS responsible, kind, count(*) AS n "
                   f"FROM ({PLACED_SQL}) p WHERE status = 'open' {where} GROUP BY 1, 2, 3", args)
    out: dict[str, Any] = {"open": 0, "by_cause": {}, "by_responsible": {}, "by_kind": {}}
    for x in rows:
        out["open"] += x["n"]
        for k, col in (("by_cause", "cause"), ("by_responsible", "responsible"), ("by_kind", "kind")):
            out[k][x[col]] = out[k].get(x[col], 0) + x["n"]
    return out


def unit_of_agent(r: Queryable, agent: str) -> str | None:
    rows = r.query("SELECT coalesce((SELECT unit FROM rooms WHERE agent = a.agent LIMIT 1), "
                   "CASE WHEN json_valid(a.labels) THEN json_extract(a.labels, '$.unit') END) AS unit "
                   "FROM agents a WHERE a.agent = ?", (agent,))
    if rows:
        return rows[0]["unit"]
    reg = r.query("SELECT unit FROM rooms WHERE agent = ?", (agent,))
    return reg[0]["unit"] if reg else None


def units_of_incidents(r: Queryable, ids: list[str]) -> dict[str, str | None]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return {x["id"]: x["unit"] for x in r.query(f"SELECT id, unit FROM ({PLACED_SQL}) p WHERE id IN ({marks})", ids)}


# ---------------------------------------------------------------- one incident, its evidence and context


def _loads(text: str | None) -> dict[str, Any]:
    try:
        v = json.loads(text or "{}")
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def _member(p: dict[str, Any], k: str) -> dict[str, Any]:
    v = p.get(k)
    return v if isinstance(v, dict) else {}


def _entry(ref: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    """One evidence entry as the incident page shows it: what was stored for it, not just its reference."""
    out: dict[str, Any] = {"boot": ref.get("boot"), "seq": ref.get("seq"), "type": ref.get("type"),
                           "ts": ref.get("ts")}
    if row is None:
        out["stored"] = False
        return out
    p = _loads(row["payload"])
    err, ctx, dev = (_member(p, k) for k in ("error", "context", "device"))
    out.update(stored=True, received_at=row["received_at"], flag=row.get("flag"), code=err.get("code"),
               source=err.get("source"), errno=err.get("errno"), problem_code=err.get("problem_code"),
               message=err.get("message"), count=err.get("count"), in_use=ctx.get("in_use"),
               users=ctx.get("users") if isinstance(ctx.get("users"), list) else None, meeting=ctx.get("meeting"),
               note=ctx.get("note"), reported_by=ctx.get("reported_by"), via=ctx.get("via"),
               port=dev.get("port"), host_boot=ctx.get("host_boot"))
    return out


def stored_evidence(r: Queryable, agent: str, refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ref in refs:
        rows = r.query("SELECT payload, received_at, flag, type FROM evidence WHERE agent = ? AND boot = ? AND seq = ? "
                       "ORDER BY id", (agent, ref.get("boot"), ref.get("seq")))
        row = next((x for x in rows if x["type"] == ref.get("type")), rows[0] if rows else None)
        out.append(_entry(ref, row))
    return out


MARK_TYPES = ("handling.reported", "device.attached", "device.detached")


def roles(kind: str, rule: str, entries: list[dict[str, Any]]) -> None:
    """Say what each evidence entry is to the decision: trouble, the handling mark relied on, the start or
    resume a window ran from, or what resolved it (the policy lists exactly these)."""
    first_error = next((i for i, e in enumerate(entries) if e["type"] == "device.error"), None)
    for i, e in enumerate(entries):
        t = e["type"]
        if t in ("agent.started", "host.resumed"):
            e["role"] = "anchor"
        elif kind == "device_error":
            if t == "device.error":
                e["role"] = "trouble"
            elif t == "device.recovered":
                e["role"] = "resolving"
            elif rule == "D1" and t in MARK_TYPES and (first_error is None or i < first_error):
                e["role"] = "mark"
            else:
                e["role"] = "trouble" if t == "device.detached" else "resolving"
        elif kind == "device_missing":
            e["role"] = "trouble" if t == "device.detached" else "resolving"
        else:
            e["role"] = "trouble" if t in ("device.detached", "device.error") else "resolving"


def host_wide_context(r: Queryable, inc: dict[str, Any], entries: list[dict[str, Any]],
                      host_wide_s: float = 60.0, after_start_s: float = 120.0) -> list[dict[str, Any]]:
    """For an H1 incident: what made it host-wide — trouble on other devices of the same PC within
    ``host_wide_s`` of its trouble, and a start or resume of that PC ``after_start_s`` before it."""
    times = []
    for e in entries:
        if e.get("role") == "trouble" and e.get("ts"):
            try:
                times.append(ts_seconds(e["ts"]))
            except ProtocolError:
                continue
    if not times:
        return []
    lo, hi = format_epoch(min(times) - max(host_wide_s, after_start_s) - 1), format_epoch(max(times) + host_wide_s + 1)
    rows = r.query("SELECT boot, seq, type, ts, device, payload, received_at, flag FROM evidence WHERE agent = ? "
                   "AND ts >= ? AND ts <= ? AND type IN ('agent.started', 'host.resumed', 'device.error', "
                   "'device.detached') ORDER BY id LIMIT 200", (inc["agent"], lo, hi))
    out = []
    for x in rows:
        try:
            t = ts_seconds(x["ts"])
        except ProtocolError:
            continue
        if x["type"] in ("agent.started", "host.resumed"):
            if any(0 <= tt - t <= after_start_s for tt in times):
                out.append({**_entry(x, x), "role": "start", "device": None})
        elif x["device"] != inc["device"] and any(abs(tt - t) <= host_wide_s for tt in times):
            out.append({**_entry(x, x), "role": "other_device", "device": x["device"]})
    return out


def audit_trail(r: Queryable, incident_id: str) -> list[dict[str, Any]]:
    rows = r.query("SELECT at, actor, action, detail FROM audit WHERE incident = ? ORDER BY id", (incident_id,))
    for h in rows:
        try:
            h["detail"] = json.loads(h["detail"])
        except ValueError:
            pass
    return rows


def device_info(r: Queryable, key: str, agent: str | None) -> dict[str, Any] | None:
    """The latest device object ``agent`` reported for ``key`` (in its inventory now, else its latest event);
    None without a room PC (what another PC saw is that PC's reader's to see)."""
    if not agent:
        return None
    rows = r.query("SELECT inventory FROM agents WHERE agent = ?", (agent,))
    for d in json.loads(rows[0]["inventory"] or "[]") if rows else []:
        if isinstance(d, dict) and d.get("key") == key:
            return d
    rows = r.query("SELECT payload FROM evidence WHERE device = ? AND agent = ? ORDER BY id DESC LIMIT 1",
                   (key, agent))
    if rows:
        d = _loads(rows[0]["payload"]).get("device")
        if isinstance(d, dict):
            return d
    return None


def lent_to_room_of(r: Queryable, key: str, agent: str) -> bool:
    """Whether ``key`` (or its serial) is lent to the room of ``agent``."""
    serial = key.split(":", 2)[2] if key.count(":") >= 2 else key
    return bool(r.query("SELECT 1 FROM loans l JOIN rooms m ON m.id = l.room WHERE (l.device = ? OR l.device = ?) "
                        "AND m.agent = ? LIMIT 1", (key, serial, agent)))


def device_agents(r: Queryable, key: str) -> list[str]:
    """The room PCs that saw ``key``, most recent first."""
    rows = r.query("SELECT agent, max(id) AS id FROM evidence WHERE device = ? GROUP BY agent ORDER BY id DESC",
                   (key,))
    return [x["agent"] for x in rows]


def device_events(r: Queryable, key: str, agent: str | None, since: str | None, until: str | None,
                  limit: int = 200) -> list[dict[str, Any]]:
    sql, args = "SELECT boot, seq, type, ts, payload, received_at, flag FROM evidence WHERE device = ?", [key]
    if agent:
        sql += " AND agent = ?"
        args.append(agent)
    if since:
        sql += " AND ts >= ?"
        args.append(since)
    if until:
        sql += " AND ts <= ?"
        args.append(until)
    rows = r.query(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])
    return [_entry(x, x) for x in rows]


# ---------------------------------------------------------------- time series


DEVICE_SERIES = ("present", "in_use", "errors_total", "resets_total", "speed_rank")
HOST_SERIES = ("cpu_pct", "mem_pct", "disk_pct", "temp_c", "uptime_s")


def choose_step(t0: float, t1: float, step: str | None) -> int:
    """0 (raw samples), 300 or 3600: the step asked for, else the finest that keeps a chart under ~600 points."""
    if step not in (None, "", "auto"):
        if step in ("raw", "0"):
            return 0
        if step in ("300", "5m"):
            return 300
        if step in ("3600", "1h"):
            return 3600
        if step in ("86400", "1d"):
            return 86400
        raise QueryError("step: must be raw, 5m (300), 1h (3600), 1d (86400) or auto")
    span = t1 - t0
    return 0 if span <= 3 * 3600 else 300 if span <= 2 * 86400 else 3600 if span <= 45 * 86400 else 86400


def series(r: Queryable, agent: str, device: str, metrics: tuple[str, ...], t0: float, t1: float,
           step: int) -> dict[str, list[list[float | None]]]:
    """Per metric: ``[bucket start (epoch s), mean, min, max, n]`` in time order, from the rollups (raw samples
    for ``step`` 0: each a point with n 1)."""
    out: dict[str, list[list[float | None]]] = {m: [] for m in metrics}
    if step == 0:
        names = ", ".join(metrics)
        if device == "_host":
            sql, args = f"SELECT ts, {names} FROM host_samples WHERE agent = ? AND ts >= ? AND ts < ?", [agent, t0, t1]
        else:
            sql = f"SELECT ts, {names} FROM device_samples WHERE agent = ? AND device = ? AND ts >= ? AND ts < ?"
            args = [agent, device, t0, t1]
        rows = r.query(sql + " ORDER BY ts LIMIT 5000", args)
        for x in rows:
            for m in metrics:
                v = x[m]
                if isinstance(v, int | float) and math.isfinite(v):
                    out[m].append([x["ts"], v, v, v, 1])
        return out
    marks = ",".join("?" * len(metrics))
    res = min(step, 3600)  # days are summed from the hourly rollups
    rows = r.query(f"SELECT metric, CAST(bucket / ? AS INTEGER) * ? AS bucket, sum(n) AS n, sum(sum) AS sum, "
                   f"min(min) AS min, max(max) AS max FROM rollup WHERE res = ? AND agent = ? AND device = ? "
                   f"AND metric IN ({marks}) AND bucket >= ? AND bucket < ? GROUP BY 1, 2 ORDER BY 1, 2",
                   [step, step, res, agent, device, *metrics, int(t0 // step * step), t1])
    for x in rows:
        n = x["n"] or 0
        out[x["metric"]].append([x["bucket"], (x["sum"] / n) if n else None, x["min"], x["max"], n])
    return out


def counter_deltas(points: list[list[float | None]]) -> list[list[float]]:
    """A counter's increase per bucket (``errors_total``): max of a bucket minus the max before it, never
    negative (a counter that restarts with the agent counts from its new value)."""
    out: list[list[float]] = []
    prev: float | None = None
    for p in points:
        top, low = p[3], p[2]
        if top is None:
            continue
        base = prev if prev is not None and prev <= float(top) else (float(low) if low is not None else 0.0)
        out.append([float(p[0] or 0), max(0.0, float(top) - base)])
        prev = float(top)
    return out


def incidents_between(r: Queryable, device: str, agent: str | None, t0: float, t1: float) -> list[dict[str, Any]]:
    sql = ("SELECT id, kind, status, rule, coalesce(decided_cause, cause) AS effective_cause, opened_at, resolved_at "
           "FROM incidents WHERE device = ? AND status != 'withdrawn' AND opened_at < ? "
           "AND (resolved_at IS NULL OR resolved_at >= ?)")
    args: list[Any] = [device, format_epoch(t1), format_epoch(t0)]
    if agent:
        sql += " AND agent = ?"
        args.append(agent)
    return r.query(sql + " ORDER BY opened_at, id LIMIT 500", args)
