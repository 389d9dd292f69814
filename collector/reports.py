"""Reports: one unit over a month or a lease period, and the fleet's failure rate per model and firmware.

Definitions (docs/dashboard.md says the same):
- a device **lent** in a period is a loan of the unit whose lease overlaps it (a lease without a start
  began before the period; one without an end is still running; ``lease_end`` is the last day, inclusive;
  a recorded return, ``returned_at``, ends it then);
- its **device-days** are the days of the period its lease covers;
- **availability** is 1 minus the time devices were down — inside an incident of kind ``device_error``
  or ``device_missing`` that was not withdrawn (an open one until the period's end) — over the
  device-days, overlapping incidents of one device counted once;
- **incidents** are those of the unit opened in the period (not withdrawn), by effective cause and
  responsible party (a decision of central IT replaces the computed cause); **overrides** are those
  with a decided cause;
- the **failure rate** of a model (vid:pid) and firmware is its incidents per 100 device-months of lent
  devices (a device-month is 30.4375 device-days), all incidents and device faults apart.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from collector.queries import PLACED_SQL, QueryError
from collector.registry import Queryable
from common.protocol import format_epoch, ts_seconds_or_none

DAY = 86400.0
MONTH_DAYS = 30.4375
DOWN_KINDS = ("device_error", "device_missing")
CAUSES = ("device_fault", "handling_damage", "host_issue", "needs_inspection")
RESPONSIBLE = ("central_it", "unit", "none", "undetermined")


@dataclass(frozen=True)
class Period:
    start: float
    end: float  # exclusive
    label: str

    @property
    def days(self) -> float:
        return (self.end - self.start) / DAY


def month(value: str) -> Period:
    try:
        if len(value) != 7:  # strptime takes "2026-1" too
            raise ValueError
        d = datetime.strptime(value, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise QueryError(f"month: {value[:20]!r} must be YYYY-MM") from None
    if not 2000 <= d.year <= 2099:
        raise QueryError("month: must be within 2000-2099")
    nxt = (d + timedelta(days=32)).replace(day=1)
    return Period(d.timestamp(), nxt.timestamp(), value)


def between(start: str, end: str) -> Period:
    """A period of whole days, ``end`` inclusive (as lease dates are written)."""
    try:
        a, b = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError:
        raise QueryError("from/to: must be dates, YYYY-MM-DD") from None
    if b < a or (b - a).days > 3660:
        raise QueryError("from/to: the end must follow the start, within ten years")
    t0 = datetime(a.year, a.month, a.day, tzinfo=UTC).timestamp()
    t1 = datetime(b.year, b.month, b.day, tzinfo=UTC).timestamp() + DAY
    return Period(t0, t1, f"{a.isoformat()}..{b.isoformat()}")


def _day(value: str | None, end: bool) -> float | None:
    if not value:
        return None
    try:
        d = date.fromisoformat(value[:10])
    except ValueError:
        return None
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() + (DAY if end else 0.0)



def lease_window(loan: dict[str, Any], p: Period) -> tuple[float, float] | None:
    a = max(p.start, _day(loan.get("lease_start"), False) or p.start)
    back = loan.get("returned_at")
    b = min(p.end, _day(loan.get("lease_end"), True) or p.end, ts_seconds_or_none(back) or _day(back, True) or p.end)
    return (a, b) if b > a else None


def _merged(intervals: list[tuple[float, float]]) -> float:
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur is not None:
        total += cur[1] - cur[0]
    return total


def _device_incidents(r: Queryable, key: str) -> list[dict[str, Any]]:
    """Incidents of a lent device: by its key, or (a loan by serial) by keys ending in that serial."""
    if key.count(":") >= 2:
        return r.query("SELECT * FROM incidents WHERE device = ? AND status != 'withdrawn'", (key,))
    return r.query("SELECT * FROM incidents WHERE substr(device, 10, 1) = ':' AND substr(device, 11) = ? "
                   "AND status != 'withdrawn'", (key,))


def unit_report(r: Queryable, unit: str, p: Period, now: float) -> dict[str, Any]:
    u = r.query("SELECT * FROM units WHERE id = ?", (unit,))
    if not u:
        raise KeyError(unit)
    rooms = {x["id"]: x["name"] for x in r.query("SELECT id, name FROM rooms WHERE unit = ?", (unit,))}
    horizon = min(p.end, now)
    devices = []
    # a loan without a room first on both stores (PostgreSQL would sort NULL last)
    for ln in r.query("SELECT * FROM loans WHERE unit = ? ORDER BY coalesce(room, ''), device", (unit,)):
        win = lease_window(ln, p)
        if win is None:
            continue
        lo, hi = win[0], min(win[1], max(win[0], horizon))
        down: list[tuple[float, float]] = []
        for inc in _device_incidents(r, ln["device"]):
            t0 = ts_seconds_or_none(inc["opened_at"])
            t1 = ts_seconds_or_none(inc["resolved_at"]) if inc["resolved_at"] else horizon
            if t0 is None or t1 is None:
                continue
            if inc["kind"] in DOWN_KINDS and t0 < hi and t1 > lo:
                down.append((max(t0, lo), min(t1, hi)))
        devices.append({"device": ln["device"], "room": ln["room"], "room_name": rooms.get(ln["room"]),
                        "lease_start": ln["lease_start"], "lease_end": ln["lease_end"],
                        "device_days": round((win[1] - win[0]) / DAY, 3),
                        "observed_days": round(max(0.0, hi - lo) / DAY, 3),
                        "down_hours": round(_merged(down) / 3600, 3)})
    rows = r.query(f"SELECT * FROM ({PLACED_SQL}) p WHERE unit = ? AND status != 'withdrawn' AND opened_at >= ? "
                   "AND opened_at < ? ORDER BY opened_at, id", (unit, format_epoch(p.start), format_epoch(p.end)))
    by_cause = dict.fromkeys(CAUSES, 0)
    by_resp = dict.fromkeys(RESPONSIBLE, 0)
    by_device: dict[str, dict[str, int]] = {}
    overrides = []
    for x in rows:
        by_cause[x["effective_cause"]] = by_cause.get(x["effective_cause"], 0) + 1
        by_resp[x["effective_responsible"]] = by_resp.get(x["effective_responsible"], 0) + 1
        per = by_device.setdefault(x["device"], {})
        per[x["effective_cause"]] = per.get(x["effective_cause"], 0) + 1
        if x["decided_cause"]:
            overrides.append({k: x[k] for k in ("id", "device", "cause", "decided_cause", "decided_by", "decided_at",
                                                "decided_reason", "opened_at")})
    for d in devices:
        serial_keys = [k for k in by_device if k == d["device"] or k[10:] == d["device"]]
        d["by_cause"] = {c: sum(by_device[k].get(c, 0) for k in serial_keys) for c in CAUSES}
        d["incidents"] = sum(d["by_cause"].values())
    observed = sum(d["observed_days"] for d in devices) * 24
    down_h = sum(d["down_hours"] for d in devices)
    return {"unit": unit, "unit_name": u[0]["name"], "pic": u[0]["pic_name"], "period": p.label,
            "from": format_epoch(p.start), "to": format_epoch(p.end), "devices_lent": len(devices),
            "device_days": round(sum(d["device_days"] for d in devices), 3),
            "availability": None if observed <= 0 else round(1 - down_h / observed, 5),
            "down_hours": round(down_h, 3), "incidents": len(rows), "by_cause": by_cause, "by_responsible": by_resp,
            "overrides": overrides, "devices": devices,
            "incident_list": [{k: x[k] for k in ("id", "device", "kind", "opened_at", "resolved_at", "rule",
                                                 "effective_cause", "effective_responsible", "room")} for x in rows]}


def unit_report_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["unit", "period", "device", "room", "lease_start", "lease_end", "device_days", "down_hours",
                "availability_pct", "incidents", *CAUSES])
    for d in rep["devices"]:
        obs = d["observed_days"] * 24
        avail = "" if obs <= 0 else f"{100 * (1 - d['down_hours'] / obs):.2f}"
        w.writerow([rep["unit"], rep["period"], d["device"], d["room"] or "", d["lease_start"] or "",
                    d["lease_end"] or "", d["device_days"], d["down_hours"], avail, d["incidents"],
                    *(d["by_cause"][c] for c in CAUSES)])
    total = "" if rep["availability"] is None else f"{100 * rep['availability']:.2f}"
    w.writerow([rep["unit"], rep["period"], "TOTAL", "", "", "", rep["device_days"], rep["down_hours"], total,
                rep["incidents"], *(rep["by_cause"][c] for c in CAUSES)])
    return _safe_csv(buf.getvalue())


def _safe_csv(text: str) -> str:
    """Cells a spreadsheet would run as formulas are written as text (see ``_cell``)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    for row in csv.reader(io.StringIO(text)):
        w.writerow([_cell(c) for c in row])
    return out.getvalue()


def _number(c: str) -> bool:
    try:
        float(c)
    except ValueError:
        return False
    return True


def _inventory_devices(r: Queryable) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for a in r.query("SELECT inventory FROM agents WHERE inventory IS NOT NULL"):
        try:
            inv = json.loads(a["inventory"])
        except ValueError:
            continue
        for d in inv if isinstance(inv, list) else []:
            if isinstance(d, dict) and isinstance(d.get("key"), str):
                out[d["key"]] = d
                if d.get("serial"):
                    out.setdefault(str(d["serial"]), d)
    return out


def failure_rates(r: Queryable, p: Period, unit: str | None = None) -> list[dict[str, Any]]:
    """Per model and firmware: lent devices, device-months, incidents and device faults per 100 device-months."""
    seen = _inventory_devices(r)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    sql, args = "SELECT * FROM loans", []
    if unit:
        sql += " WHERE unit = ?"
        args.append(unit)
    for ln in r.query(sql, args):
        win = lease_window(ln, p)
        if win is None:
            continue
        key = ln["device"]
        info = seen.get(key)
        if info is None and key.count(":") >= 2:
            ev = r.query("SELECT payload FROM evidence WHERE device = ? ORDER BY id DESC LIMIT 1", (key,))
            try:
                info = json.loads(ev[0]["payload"]).get("device") if ev else None
            except (ValueError, AttributeError):
                info = None
        info = info if isinstance(info, dict) else {}
        model = f"{info['vid']}:{info['pid']}" if info.get("vid") and info.get("pid") else \
            (key[:9] if key.count(":") >= 2 else "?")
        g = groups.setdefault((model, str(info.get("firmware") or "?")), {
            "model": model, "firmware": str(info.get("firmware") or "?"), "product": info.get("product"),
            "vendor": info.get("vendor"), "devices": 0, "device_months": 0.0, "incidents": 0, "device_faults": 0})
        g["product"] = g["product"] or info.get("product")
        g["devices"] += 1
        g["device_months"] += (win[1] - win[0]) / DAY / MONTH_DAYS
        for inc in _device_incidents(r, key):
            t = ts_seconds_or_none(inc["opened_at"])
            if t is None or not win[0] <= t < win[1]:
                continue
            g["incidents"] += 1
            g["device_faults"] += (inc["decided_cause"] or inc["cause"]) == "device_fault"
    out = []
    for g in groups.values():
        dm = g["device_months"]
        out.append({**g, "device_months": round(dm, 3),
                    "incidents_per_100": None if dm <= 0 else round(100 * g["incidents"] / dm, 2),
                    "faults_per_100": None if dm <= 0 else round(100 * g["device_faults"] / dm, 2)})
    out.sort(key=lambda g: (-(g["faults_per_100"] or 0), -(g["incidents_per_100"] or 0), g["model"], g["firmware"]))
    return out


def failure_rates_csv(rows: list[dict[str, Any]], p: Period) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["period", "model", "firmware", "product", "devices", "device_months", "incidents",
                "incidents_per_100_device_months", "device_faults", "faults_per_100_device_months"])
    for g in rows:
        w.writerow([p.label, g["model"], g["firmware"], g["product"] or "", g["devices"], g["device_months"],
                    g["incidents"], "" if g["incidents_per_100"] is None else g["incidents_per_100"],
                    g["device_faults"], "" if g["faults_per_100"] is None else g["faults_per_100"]])
    return _safe_csv(buf.getvalue())


def _cell(c: str) -> str:
    """A CSV cell a spreadsheet cannot run: one whose first visible character is =, +, -, @ (or that starts
    with a tab, CR or LF before one) gets a leading quote; control characters are dropped."""
    clean = "".join(ch for ch in c if ch >= " " or ch == "\n")
    head = clean.lstrip(" \t\r\n")[:1]
    if (head in ("=", "+", "-", "@") and not _number(clean.strip())) or c[:1] in ("\t", "\r", "\n"):
        return "'" + clean
    return clean
