"""What is in each room now: every room PC with the devices lent to its room and the devices it reports,
each with a status the dashboard (and any test) can read — ``present``, ``in_use``, ``missing`` or
``error`` — and the flags of the PC itself (offline too long in working hours, clock off).

A device is **missing** the moment its room PC's inventory stops listing it, before any incident opens
(an incident waits 10 min for it to come back): a device lent to the room that is not attached, or a
device the PC saw detach in the last ``missing_memory_s`` and has not seen since. A missing device
that was detached while in use is marked ``pulled_in_use``. A missing device outranks an error, an
error outranks use.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from collector.registry import Queryable
from common.protocol import format_epoch, ts_seconds_or_none

CLOCK_SUSPECT_S = 120.0
STATUSES = ("present", "in_use", "missing", "error")
_RANK = {"missing": 0, "error": 1, "in_use": 2, "present": 3}


@dataclass(frozen=True)
class FleetSettings:
    offline_after_s: float = 2 * 3600.0  # offline this long, counted in working hours only, is flagged
    work_start_h: int = 7
    work_end_h: int = 17
    work_days: tuple[int, ...] = (0, 1, 2, 3, 4)  # Monday .. Friday
    tz_offset_h: float = 7.0  # WIB
    missing_memory_s: float = 7 * 86400.0
    clock_suspect_s: float = CLOCK_SUSPECT_S


def working_seconds(t0: float, t1: float, s: FleetSettings) -> float:
    """Seconds between ``t0`` and ``t1`` (epoch) that fall in working hours, in the office's zone."""
    if t1 <= t0:
        return 0.0
    tz = timedelta(hours=s.tz_offset_h)
    a, b = datetime.fromtimestamp(t0, UTC) + tz, datetime.fromtimestamp(t1, UTC) + tz
    total = 0.0
    day = a.replace(hour=0, minute=0, second=0, microsecond=0)
    for _ in range(400):  # a bound on days looked at: more than a year offline is "more than enough"
        if day > b:
            break
        if day.weekday() in s.work_days:
            lo = max(a, day + timedelta(hours=s.work_start_h))
            hi = min(b, day + timedelta(hours=s.work_end_h))
            total += max(0.0, (hi - lo).total_seconds())
        day += timedelta(days=1)
    return total


def _json(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default



def _serial(key: str) -> str | None:
    return key[10:] if len(key) > 10 and key[9] == ":" else None


def _model(key: str) -> str:
    return key[:9]


def agent_flags(a: dict[str, Any], now: float, s: FleetSettings) -> dict[str, Any]:
    """Online state, when last heard of (on the collector's clock), offline-too-long and clock flags."""
    off = a.get("clock_offset_s")
    off = float(off) if isinstance(off, int | float) and math.isfinite(off) else None
    seen = ts_seconds_or_none(a.get("last_seen"))
    heard = None if seen is None else seen + (off or 0.0)  # the agent's clock turned into the collector's
    online = a.get("state") == "online"
    down = 0.0 if online or heard is None else working_seconds(heard, now, s)
    return {"online": online, "heard_at": None if heard is None else format_epoch(min(heard, now)),
            "offline_working_s": round(down), "offline_long": (not online) and down > s.offline_after_s,
            "clock_offset_s": off, "clock_suspect": off is not None and abs(off) > s.clock_suspect_s}


def snapshot(r: Queryable, unit: str | None = None, s: FleetSettings | None = None,
             now: float | None = None, agent: str | None = None) -> list[dict[str, Any]]:
    """Every room PC (limited to ``unit`` or one ``agent``) with its devices and their status, and the
    registered rooms no PC has reported from yet."""
    s = s or FleetSettings()
    now = time.time() if now is None else now
    units = {u["id"]: u for u in r.query("SELECT * FROM units")}
    all_rooms = r.query("SELECT * FROM rooms")
    by_id = {x["id"]: x for x in all_rooms}
    rooms = [x for x in all_rooms if not agent or x["agent"] == agent]
    room_of = {x["agent"]: x for x in rooms if x["agent"]}
    loans = r.query("SELECT * FROM loans WHERE room IS NOT NULL AND returned_at IS NULL")  # returned: not expected
    lent: dict[str, list[dict[str, Any]]] = {}
    for ln in loans:
        lent.setdefault(ln["room"], []).append(ln)
    arows = r.query("SELECT agent, state, reason, last_seen, hostname, version, platform, labels, inventory, devices, "
                    "clock, clock_offset_s FROM agents" + (" WHERE agent = ?" if agent else "") + " ORDER BY agent",
                    (agent,) if agent else ())
    since = format_epoch(now - s.missing_memory_s)
    detaches: dict[tuple[str, str], int] = {}
    args: list[Any] = [since]
    sql = ("SELECT agent, device, max(id) AS id FROM evidence WHERE type = 'device.detached' AND received_at >= ?")
    if agent:
        sql += " AND agent = ?"
        args.append(agent)
    for x in r.query(sql + " GROUP BY agent, device", args):
        detaches[(x["agent"], x["device"])] = x["id"]
    # an inventory or attach after a detach: back. A detach after both: gone, even if no inventory followed
    later: dict[tuple[str, str], int] = {}
    sql = ("SELECT agent, device, type, max(id) AS id FROM evidence WHERE type IN ('device.attached', 'inventory') "
           "AND received_at >= ?") + (" AND agent = ?" if agent else "") + " GROUP BY agent, device, type"
    for x in r.query(sql, args):
        later[(x["agent"], x["device"] or "")] = max(x["id"], later.get((x["agent"], x["device"] or ""), 0))
    incidents: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for x in r.query("SELECT id, agent, device, kind, rule, coalesce(decided_cause, cause) AS cause FROM incidents "
                     "WHERE status = 'open'" + (" AND agent = ?" if agent else ""), (agent,) if agent else ()):
        incidents.setdefault((x["agent"], x["device"]), []).append(x)
    out = []
    for a in arows:
        labels = _json(a["labels"], {})
        labels = labels if isinstance(labels, dict) else {}
        room = room_of.get(a["agent"])
        unit_id = room["unit"] if room else (labels.get("unit") if isinstance(labels.get("unit"), str) else None)
        if unit is not None and unit_id != unit:
            continue
        room_id = room["id"] if room else (labels.get("room") if isinstance(labels.get("room"), str) else None)
        other = by_id.get(room_id or "")
        expected = lent.get(room_id or "", []) if room or (other is not None and not other["agent"]) else []
        out.append(_room(r, a, room, unit_id, room_id, units.get(unit_id or ""), expected,
                         detaches, later, incidents, now, s))
    seen = {a["agent"] for a in arows}
    for rm in rooms:
        if rm["agent"] in seen or (unit is not None and rm["unit"] != unit):
            continue
        u = units.get(rm["unit"])
        devs = [{"key": ln["device"], "status": "missing", "registered": True, "lease_end": ln["lease_end"],
                 "lease_start": ln["lease_start"], "never_seen": True} for ln in lent.get(rm["id"], [])]
        out.append({"agent": rm["agent"], "room": rm["id"], "room_name": rm["name"], "unit": rm["unit"],
                    "unit_name": u["name"] if u else None, "pic": _pic(u), "state": "never", "online": False,
                    "heard_at": None, "offline_working_s": 0, "offline_long": False, "clock_offset_s": None,
                    "clock_suspect": False, "devices": devs, "counts": _counts(devs)})
    return out


def _pic(u: dict[str, Any] | None) -> dict[str, Any] | None:
    return {"name": u["pic_name"], "email": u["pic_email"], "phone": u["pic_phone"]} if u else None


def _counts(devs: list[dict[str, Any]]) -> dict[str, int]:
    c = dict.fromkeys(STATUSES, 0)
    for d in devs:
        c[d["status"]] += 1
    return c


def _room(r: Queryable, a: dict[str, Any], room: dict[str, Any] | None, unit_id: str | None, room_id: str | None,
          u: dict[str, Any] | None, lent: list[dict[str, Any]], detaches: dict[tuple[str, str], int],
          later: dict[tuple[str, str], int], incidents: dict[tuple[str, str], list[dict[str, Any]]], now: float,
          s: FleetSettings) -> dict[str, Any]:
    agent = a["agent"]
    inventory = [d for d in _json(a["inventory"], []) if isinstance(d, dict) and isinstance(d.get("key"), str)]
    inv_id = later.get((agent, ""), 0)
    inventory = [d for d in inventory
                 if detaches.get((agent, d["key"]), 0) <= max(inv_id, later.get((agent, d["key"]), 0))]
    tele = {d.get("key"): d for d in _json(a["devices"], []) if isinstance(d, dict)}
    attached = {d["key"] for d in inventory}
    serials = {_serial(k): k for k in attached if _serial(k)}
    models = {_model(k) for k in attached}
    devs: list[dict[str, Any]] = []
    loan_of = {ln["device"]: ln for ln in lent}
    for d in inventory:
        key = d["key"]
        ln = loan_of.get(key) or loan_of.get(_serial(key) or "")
        t = tele.get(key) or {}
        errs = [i for i in incidents.get((agent, key), []) if i["kind"] == "device_error"]
        status = "error" if errs else "in_use" if t.get("in_use") is True else "present"
        devs.append({**{k: d.get(k) for k in ("key", "kind", "vendor", "product", "serial", "port", "speed",
                                               "max_speed", "firmware", "vid", "pid")},
                     "status": status, "registered": ln is not None,
                     "lease_start": ln["lease_start"] if ln else None, "lease_end": ln["lease_end"] if ln else None,
                     "incidents": [i["id"] for i in incidents.get((agent, key), [])]})
    gone: dict[str, dict[str, Any]] = {}
    for ln in lent:  # lent to this room and not attached: missing
        if ln["device"] in attached or ln["device"] in serials:
            continue
        gone[ln["device"]] = {"key": ln["device"], "registered": True, "lease_start": ln["lease_start"],
                              "lease_end": ln["lease_end"]}
    for (ag, key), _ in detaches.items():  # seen to detach here lately and not back
        if ag != agent or key in attached or key in gone or (_serial(key) and _serial(key) in serials):
            continue
        if "@" in key and _model(key) in models:
            continue  # a device without a serial is keyed by its port: back on another port, it is not missing
        gone[key] = {"key": key, "registered": False, "lease_start": None, "lease_end": None}
    for key, g in gone.items():
        ev = _last_detach(r, agent, key, detaches.get((agent, key)))
        dev, ctx = _member(ev, "device"), _member(ev, "context")
        g.update({k: dev.get(k) for k in ("kind", "vendor", "product", "serial", "port", "firmware", "vid", "pid")})
        g.update(status="missing", missing_since=ev.get("ts"), pulled_in_use=ctx.get("in_use") is True,
                 users=ctx.get("users") if isinstance(ctx.get("users"), list) else [],
                 never_seen=not ev, incidents=[i["id"] for i in incidents.get((agent, key), [])])
        devs.append(g)
    devs.sort(key=lambda d: (_RANK[d["status"]], str(d.get("kind")), d["key"]))
    flags = agent_flags(a, now, s)
    return {"agent": agent, "room": room_id, "room_name": room["name"] if room else None, "unit": unit_id,
            "unit_name": u["name"] if u else None, "pic": _pic(u), "state": a["state"] or "offline",
            "reason": a["reason"], "last_seen": a["last_seen"], "hostname": a["hostname"], "version": a["version"],
            "platform": a["platform"], "clock": a["clock"], **flags, "devices": devs, "counts": _counts(devs)}


def _member(p: dict[str, Any], k: str) -> dict[str, Any]:
    v = p.get(k)
    return v if isinstance(v, dict) else {}


def _last_detach(r: Queryable, agent: str, key: str, known: int | None) -> dict[str, Any]:
    if known is not None:
        rows = r.query("SELECT payload FROM evidence WHERE id = ?", (known,))
    else:
        rows = r.query("SELECT payload FROM evidence WHERE device = ? AND agent = ? AND type = 'device.detached' "
                       "ORDER BY id DESC LIMIT 1", (key, agent))
    v = _json(rows[0]["payload"], {}) if rows else {}
    return v if isinstance(v, dict) else {}


def totals(rooms: list[dict[str, Any]]) -> dict[str, Any]:
    """The overview's first line: rooms, devices by status, PCs offline too long, clocks off."""
    c = dict.fromkeys(STATUSES, 0)
    pulled = 0
    for rm in rooms:
        for d in rm["devices"]:
            c[d["status"]] += 1
            pulled += bool(d.get("pulled_in_use"))
    return {"rooms": len(rooms), "devices": sum(c.values()), **c, "pulled_in_use": pulled,
            "online": sum(1 for rm in rooms if rm["online"]),
            "offline": sum(1 for rm in rooms if not rm["online"] and rm["state"] != "never"),
            "offline_long": sum(1 for rm in rooms if rm["offline_long"]),
            "never": sum(1 for rm in rooms if rm["state"] == "never"),
            "clock_suspect": sum(1 for rm in rooms if rm["clock_suspect"])}


ROOM_SORTS = ("room", "unit", "state", "last_seen", "problems", "devices")


def room_matches(rm: dict[str, Any], q: str | None, status: str | None, kind: str | None, model: str | None) -> bool:
    if status:
        ok = {"missing": rm["counts"]["missing"] > 0, "error": rm["counts"]["error"] > 0,
              "in_use": rm["counts"]["in_use"] > 0, "offline": not rm["online"],
              "offline_long": rm["offline_long"], "clock": rm["clock_suspect"],
              "ok": rm["online"] and not rm["counts"]["missing"] and not rm["counts"]["error"]}
        if status not in ok:
            raise ValueError(f"status: must be one of {', '.join(ok)}")
        if not ok[status]:
            return False
    if kind and not any(d.get("kind") == kind for d in rm["devices"]):
        return False
    if model and not any(d["key"].startswith(model.lower()) for d in rm["devices"]):
        return False
    if q and q.strip():
        needle = q.strip().lower()
        pic = (rm.get("pic") or {}).get("name")
        hay = [rm["agent"], rm["room"], rm["room_name"], rm["unit"], rm["unit_name"], pic, rm.get("hostname")]
        for d in rm["devices"]:
            hay += [d["key"], d.get("product"), d.get("vendor"), d.get("serial")]
        if not any(needle in str(h).lower() for h in hay if h):
            return False
    return True


def sort_rooms(rooms: list[dict[str, Any]], sort: str, order: str) -> list[dict[str, Any]]:
    if sort not in ROOM_SORTS:
        raise ValueError(f"sort: must be one of {', '.join(ROOM_SORTS)}")
    if order not in ("asc", "desc"):
        raise ValueError("order: must be asc or desc")

    def key(rm: dict[str, Any]) -> tuple[Any, ...]:
        name = str(rm.get("room_name") or rm.get("room") or rm.get("agent") or "")
        v: Any = {"room": name.lower(), "unit": str(rm.get("unit_name") or rm.get("unit") or "").lower(),
                  "state": (rm["online"], not rm["offline_long"]), "last_seen": rm.get("heard_at") or "",
                  "problems": (rm["counts"]["missing"] + rm["counts"]["error"], rm["offline_long"],
                               rm["clock_suspect"]),
                  "devices": len(rm["devices"])}[sort]
        return (v, name.lower(), str(rm.get("agent")))

    return sorted(rooms, key=key, reverse=order == "desc")
