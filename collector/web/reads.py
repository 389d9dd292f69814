"""The dashboard's read API: the overview's counts, rooms and incidents a page at a time (filtered,
sorted and counted in the store), one room, device or incident, history from the rollups, reports, the
names people read, and the change feed.

Lists answer a JSON array with the number of matches in ``X-Total-Count``. A PIC sees only their unit:
lists hold nothing else whatever the query says, and another unit's room, device, incident or report
answers 404 — as if it did not exist; the change feed tells them only of their unit's changes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from starlette.responses import Response, StreamingResponse

from collector import fleet, queries, reports
from collector.policy import (
    CAUSE_NAMES,
    DEVICE_KIND_NAMES,
    INCIDENT_KIND_NAMES,
    POLICY_VERSION,
    RESPONSIBLE_NAMES,
    RULES,
    RULES_BY_ID,
)
from collector.registry import lookup
from collector.web.auth import Identity, Reading, resolve, state_of
from collector.web.views import SafeJSONResponse, WebState, sees_unit
from common.protocol import DEVICE_KINDS, ERROR_CODES, format_epoch

router = APIRouter()
Limit = Query(queries.DEFAULT_LIMIT, ge=1, le=queries.MAX_LIMIT)
Offset = Query(0, ge=0, le=10_000_000)


def _scope(ident: Identity, unit: str | None) -> str | None:
    return ident.user.unit if ident.user.scoped else (unit or None)


SNAPSHOT_TTL_S = 3.0  # what only telemetry changes (in use, last heard) may be this old; events never


def _rooms(st: WebState, unit: str | None) -> list[dict[str, Any]]:
    """The fleet's rooms now, computed once for the overview's counts and its rooms table alike, and again as
    soon as evidence, an incident or the audit chain (registry changes) moves."""
    mark = st.reader.query("SELECT (SELECT max(id) FROM evidence) AS e, (SELECT max(updated_at) FROM incidents) "
                           "AS i, (SELECT max(id) FROM audit) AS a")[0]
    key = (unit, mark["e"], mark["i"], mark["a"])
    cache: dict[str | None, tuple[Any, float, list[dict[str, Any]]]] = st.__dict__.setdefault("snapshots", {})
    hit = cache.get(unit)
    now = time.monotonic()
    if hit is not None and hit[0] == key and now - hit[1] < SNAPSHOT_TTL_S:
        return hit[2]
    rooms = fleet.snapshot(st.reader, unit, st.settings.fleet)
    if len(cache) > 64:
        cache.clear()
    cache[unit] = (key, now, rooms)
    return rooms


def _bad(exc: Exception) -> HTTPException:
    return HTTPException(400, str(exc))


def _one_of(name: str, value: str | None, allowed: Any) -> str | None:
    """A filter's value, one of ``allowed`` (an empty value is no filter); 400 otherwise."""
    if value is None or value == "":
        return None
    if value not in allowed:
        raise HTTPException(400, f"{name}: {value[:40]!r} must be one of {', '.join(str(a) for a in allowed if a)}")
    return value


def _page(rows: list[Any], total: int, started: float) -> SafeJSONResponse:
    return SafeJSONResponse(rows, headers={"X-Total-Count": str(total),
                                           "Server-Timing": f"db;dur={(time.perf_counter() - started) * 1000:.1f}"})


# ---------------------------------------------------------------- names and settings


@router.get("/api/meta", tags=["fleet"], summary="Names of causes, parties, kinds and rules in id and en; settings")
def meta(request: Request, ident: Reading) -> dict[str, Any]:
    st = state_of(request)
    kinds = {lang: {("other" if k is None else k): v for k, v in names.items()}
             for lang, names in DEVICE_KIND_NAMES.items()}
    w = st.windows
    fs = st.settings.fleet
    return {"policy": POLICY_VERSION, "causes": CAUSE_NAMES, "responsible": RESPONSIBLE_NAMES, "device_kinds": kinds,
            "incident_kinds": INCIDENT_KIND_NAMES,
            "rules": [{"id": r.id, "applies_to": r.applies_to, "cause": r.cause, "responsible": r.responsible,
                       "confidence": r.confidence, "condition": r.condition,
                       "explain": {"id": r.explain_id, "en": r.explain_en}} for r in RULES],
            "error_codes": ERROR_CODES, "windows": {k: getattr(w, k) for k in vars(w)},
            "fleet": {"offline_after_s": fs.offline_after_s, "work_start_h": fs.work_start_h,
                      "work_end_h": fs.work_end_h, "work_days": list(fs.work_days), "tz_offset_h": fs.tz_offset_h,
                      "clock_suspect_s": fs.clock_suspect_s}}


# ---------------------------------------------------------------- overview and rooms


@router.get("/api/overview", tags=["fleet"], summary="Counts first: rooms, devices by status, open incidents, flags")
def overview(request: Request, ident: Reading, unit: str | None = None) -> Response:
    started = time.perf_counter()
    st = state_of(request)
    only = _scope(ident, unit)
    rooms = _rooms(st, only)
    body = {"unit": only, "fleet": fleet.totals(rooms), "incidents": queries.incident_counts(st.reader, only),
            "at": format_epoch(time.time())}
    return SafeJSONResponse(body, headers={"Server-Timing": f"db;dur={(time.perf_counter() - started) * 1000:.1f}"})


@router.get("/api/fleet", tags=["fleet"], summary="Rooms with their devices' status now, a page at a time")
def rooms_now(request: Request, ident: Reading, unit: str | None = None, q: str | None = Query(None, max_length=100),
              status: str | None = None, kind: str | None = None, model: str | None = Query(None, max_length=9),
              sort: str = "problems", order: Literal["asc", "desc"] = "desc", limit: int = Limit,
              offset: int = Offset) -> Response:
    started = time.perf_counter()
    st = state_of(request)
    kind = _one_of("kind", kind, DEVICE_KINDS)
    rooms = _rooms(st, _scope(ident, unit))
    try:
        rows = fleet.sort_rooms([r for r in rooms if fleet.room_matches(r, q, status, kind, model)], sort, order)
    except ValueError as exc:
        raise _bad(exc) from None
    return _page(rows[offset:offset + limit], len(rows), started)


@router.get("/api/fleet/{agent}", tags=["fleet"], summary="One room PC: its devices now, flags, recent events")
def room_now(agent: str, request: Request, ident: Reading) -> dict[str, Any]:
    st = state_of(request)
    rooms = fleet.snapshot(st.reader, None, st.settings.fleet, agent=agent)
    if not rooms or not sees_unit(ident.user, rooms[0]["unit"]):
        raise HTTPException(404, f"no room PC {agent}")
    room = rooms[0]
    room["incidents"], _ = queries.incident_page(st.reader, queries.IncidentQuery(
        agent=agent, status="all", limit=20, unit=_scope(ident, None)))  # a PIC: only their unit's, even here
    return room


# ---------------------------------------------------------------- incidents


@router.get("/api/incidents", tags=["incidents"],
            summary="Incidents a page at a time, newest first: filters, search and sort in the store")
def incidents(request: Request, ident: Reading,
              status: Literal["open", "resolved", "withdrawn", "all"] | None = None, all: bool = False,
              unit: str | None = None, cause: str | None = None, responsible: str | None = None,
              kind: str | None = None, model: str | None = Query(None, max_length=9), agent: str | None = None,
              device: str | None = None, q: str | None = Query(None, max_length=100),
              since: str | None = None, until: str | None = None, sort: str = "opened_at",
              order: Literal["asc", "desc"] = "desc", limit: int = Limit, offset: int = Offset) -> Response:
    started = time.perf_counter()
    cause = _one_of("cause", cause, CAUSE_NAMES["en"])
    responsible = _one_of("responsible", responsible, RESPONSIBLE_NAMES["en"])
    kind = _one_of("kind", kind, INCIDENT_KIND_NAMES["en"])
    iq = queries.IncidentQuery(unit=_scope(ident, unit), status=status or ("all" if all else None), cause=cause,
                               responsible=responsible, kind=kind, model=model, agent=agent, device=device, q=q,
                               since=since, until=until, sort=sort, order=order, limit=limit, offset=offset)
    try:
        rows, total = queries.incident_page(state_of(request).reader, iq)
    except queries.QueryError as exc:
        raise _bad(exc) from None
    return _page(rows, total, started)


def incident_detail(st: WebState, ident: Identity, iid: str) -> dict[str, Any]:
    r = st.reader
    inc = queries.placed_incident(r, iid)
    if inc is None or not sees_unit(ident.user, inc["unit"]):
        raise HTTPException(404, f"no incident {iid}")
    rows = r.query("SELECT evidence FROM incidents WHERE id = ?", (iid,))
    try:
        refs = json.loads(rows[0]["evidence"]) if rows else []
    except ValueError:
        refs = []
    entries = queries.stored_evidence(r, inc["agent"], refs)
    queries.roles(inc["kind"], inc["rule"], entries)
    inc["evidence"] = entries
    w = st.windows
    inc["host_wide_context"] = queries.host_wide_context(r, inc, entries, w.host_wide_s, w.after_start_s) \
        if inc["rule"] == "H1" else []
    rule = RULES_BY_ID.get(inc["rule"])
    inc["rule_text"] = None if rule is None else {"condition": rule.condition,
                                                  "explain": {"id": rule.explain_id, "en": rule.explain_en}}
    inc["history"] = queries.audit_trail(r, iid)
    inc["registry"] = lookup(r, inc["device"], inc["agent"])
    inc["device_info"] = queries.device_info(r, inc["device"], inc["agent"])
    return inc


@router.get("/api/incidents/{id}", tags=["incidents"],
            summary="One incident: stored evidence with codes, errno, raw lines and use; rule; decisions; audit")
def incident(id: str, request: Request, ident: Reading) -> dict[str, Any]:
    return incident_detail(state_of(request), ident, id)


# ---------------------------------------------------------------- devices and history


def _device_places(st: WebState, ident: Identity, key: str) -> list[str]:
    """The room PCs that have seen a device, those of the reader's unit only for a PIC."""
    places = queries.device_agents(st.reader, key)
    if ident.user.scoped:
        places = [a for a in places if queries.unit_of_agent(st.reader, a) == ident.user.unit]
    return places


def _device_place(st: WebState, ident: Identity, key: str, agent: str | None) -> tuple[str | None, dict[str, Any]]:
    """Where to show a device (the room PC named, else the latest that saw it) and its registry entry; 404
    for a device nobody saw or lent, a PC of another unit, or a PC that neither saw the device nor has it
    lent to its room."""
    if agent and (not sees_unit(ident.user, queries.unit_of_agent(st.reader, agent))
                  or (queries.device_info(st.reader, key, agent) is None  # its inventory, or its own evidence
                      and not queries.lent_to_room_of(st.reader, key, agent))):
        raise HTTPException(404, f"no device {key}")
    places = _device_places(st, ident, key)
    where = agent or (places[0] if places else None)
    reg = lookup(st.reader, key, where)
    known = bool(places) or reg["registered"] or agent is not None
    if not known or not sees_unit(ident.user, reg["unit"]):
        raise HTTPException(404, f"no device {key}")
    return where, reg


def _range(frm: str | None, to: str | None, default_s: float) -> tuple[float, float]:
    try:
        t1 = queries.epoch(to, "to") or time.time()
        t0 = queries.epoch(frm, "from") or t1 - default_s
    except queries.QueryError as exc:
        raise _bad(exc) from None
    if t1 <= t0:
        raise HTTPException(400, "from: must be before to")
    if t1 - t0 > 800 * 86400:
        raise HTTPException(400, "from/to: at most 800 days at once")
    return t0, t1


@router.get("/api/devices/{key:path}/history", tags=["history"],
            summary="A device's presence, use, errors and speed over time, from the rollups (raw for short spans)")
def device_history(key: str, request: Request, ident: Reading, agent: str | None = None,
                   frm: str | None = Query(None, alias="from"), to: str | None = None,
                   step: str | None = None) -> Response:
    started = time.perf_counter()
    st = state_of(request)
    where, _ = _device_place(st, ident, key, agent)
    t0, t1 = _range(frm, to, 86400)
    try:
        res = queries.choose_step(t0, t1, step)
    except queries.QueryError as exc:
        raise _bad(exc) from None
    s = queries.series(st.reader, where or "", key, queries.DEVICE_SERIES, t0, t1, res) if where else \
        {m: [] for m in queries.DEVICE_SERIES}
    body = {"device": key, "agent": where, "from": format_epoch(t0), "to": format_epoch(t1), "step": res,
            "series": s, "errors": queries.counter_deltas(s["errors_total"]),
            "incidents": queries.incidents_between(st.reader, key, where, t0, t1),
            "events": queries.device_events(st.reader, key, where, format_epoch(t0), format_epoch(t1))}
    return SafeJSONResponse(body, headers={"Server-Timing": f"db;dur={(time.perf_counter() - started) * 1000:.1f}"})


@router.get("/api/devices/{key:path}", tags=["fleet"], summary="One device: what it is, where, its loan and incidents")
def device(key: str, request: Request, ident: Reading, agent: str | None = None) -> dict[str, Any]:
    st = state_of(request)
    where, reg = _device_place(st, ident, key, agent)
    now = None
    if where:
        rooms = fleet.snapshot(st.reader, None, st.settings.fleet, agent=where)
        now = next((d for d in rooms[0]["devices"] if d["key"] == key), None) if rooms else None
    loan = st.reader.query("SELECT * FROM loans WHERE device = ? OR device = ?",
                           (key, key[10:] if len(key) > 10 and key[9] == ":" else key))
    rows, _ = queries.incident_page(st.reader, queries.IncidentQuery(device=key, status="all", limit=50,
                                                                     unit=_scope(ident, None)))
    return {"key": key, "agent": where, "agents": _device_places(st, ident, key), "registry": reg,
            "loan": loan[0] if loan else None, "info": queries.device_info(st.reader, key, where), "now": now,
            "incidents": rows}


@router.get("/api/agents/{agent}/history", tags=["history"],
            summary="A room PC's CPU, memory, disk, temperature and uptime over time, from the rollups")
def agent_history(agent: str, request: Request, ident: Reading, frm: str | None = Query(None, alias="from"),
                  to: str | None = None, step: str | None = None) -> Response:
    started = time.perf_counter()
    st = state_of(request)
    known = st.reader.query("SELECT 1 FROM agents WHERE agent = ?", (agent,))
    if not known or not sees_unit(ident.user, queries.unit_of_agent(st.reader, agent)):
        raise HTTPException(404, f"no room PC {agent}")
    t0, t1 = _range(frm, to, 86400)
    try:
        res = queries.choose_step(t0, t1, step)
    except queries.QueryError as exc:
        raise _bad(exc) from None
    body = {"agent": agent, "from": format_epoch(t0), "to": format_epoch(t1), "step": res,
            "series": queries.series(st.reader, agent, "_host", queries.HOST_SERIES, t0, t1, res)}
    return SafeJSONResponse(body, headers={"Server-Timing": f"db;dur={(time.perf_counter() - started) * 1000:.1f}"})


# ---------------------------------------------------------------- reports


def _period(month: str | None, frm: str | None, to: str | None) -> reports.Period:
    try:
        if month:
            return reports.month(month)
        if frm and to:
            return reports.between(frm, to)
    except queries.QueryError as exc:
        raise _bad(exc) from None
    raise HTTPException(400, "give month=YYYY-MM, or from= and to= (YYYY-MM-DD)")


@router.get("/api/reports/unit", tags=["reports"],
            summary="One unit over a month or a lease period: lent devices, availability, incidents, overrides")
def unit_report(request: Request, ident: Reading, unit: str | None = None, month: str | None = None,
                frm: str | None = Query(None, alias="from"), to: str | None = None,
                format: Literal["json", "csv"] = "json") -> Response:
    st = state_of(request)
    u = _scope(ident, unit)
    if not u:
        raise HTTPException(400, "unit: which unit?")
    p = _period(month, frm, to)
    try:
        rep = reports.unit_report(st.reader, u, p, time.time())
    except KeyError:
        raise HTTPException(404, f"no unit {u}") from None
    if format == "csv":
        name = f"pantau-{u}-{p.label}.csv".replace("..", "_")
        return Response(reports.unit_report_csv(rep), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{_filename(name)}"'})
    return SafeJSONResponse(rep)


@router.get("/api/reports/failure-rates", tags=["reports"],
            summary="Incidents and device faults per 100 device-months, per model and firmware (a PIC: their unit)")
def failure_rates(request: Request, ident: Reading, frm: str | None = Query(None, alias="from"),
                  to: str | None = None, month: str | None = None, unit: str | None = None,
                  format: Literal["json", "csv"] = "json") -> Response:
    st = state_of(request)
    if not (month or frm or to):
        end = time.gmtime()
        y, m = (end.tm_year, end.tm_mon)
        frm, to = f"{y - 1:04d}-{m:02d}-01", time.strftime("%Y-%m-%d", end)
    p = _period(month, frm, to)
    rows = reports.failure_rates(st.reader, p, _scope(ident, unit))
    if format == "csv":
        return Response(reports.failure_rates_csv(rows, p), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{_filename("pantau-failure-rates-" + p.label)}.csv"'})
    return SafeJSONResponse({"period": p.label, "from": format_epoch(p.start), "to": format_epoch(p.end),
                             "rows": rows})


def _filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]


# ---------------------------------------------------------------- the change feed


FEED_RECHECK_S = 2.0  # how often an open change feed checks that its reader is still signed in


@router.get("/api/events", tags=["fleet"], response_class=StreamingResponse,
            summary="Server-sent events: which room PCs and incidents changed (a PIC: their unit's only)")
async def events(request: Request, ident: Reading) -> StreamingResponse:
    st = state_of(request)
    sub = st.feed.subscribe(ident.user)
    headers = {k.lower(): v for k, v in request.headers.items()}
    caller = request.state.caller
    who = (ident.user.name, ident.user.role, ident.user.unit)

    async def still_signed_in() -> bool:
        """The session or token that opened the stream still stands for the same account, role and unit
        (signed out, disabled or changed: the stream ends, and the page asks again)."""
        again, _ = await anyio.to_thread.run_sync(resolve, st, headers, caller)
        return again is not None and (again.user.name, again.user.role, again.user.unit) == who

    async def stream() -> Any:
        try:
            yield b"retry: 1000\n: ready\n\n"
            checked = quiet = time.monotonic()
            while not st.closing.is_set():
                msg: dict[str, Any] | bool | None
                try:
                    msg = await asyncio.wait_for(sub.queue.get(), FEED_RECHECK_S)
                except TimeoutError:
                    msg = False  # nothing came
                now = time.monotonic()
                if msg is None or (now - checked >= FEED_RECHECK_S and not await still_signed_in()):
                    break
                if now - checked >= FEED_RECHECK_S:
                    checked = now
                if msg is False:
                    if now - quiet >= 15:
                        quiet = now
                        yield b": keep-alive\n\n"
                    continue
                quiet = now
                yield f"event: change\ndata: {json.dumps(msg, separators=(',', ':'))}\n\n".encode()
        finally:
            st.feed.unsubscribe(sub)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
