"""The lease of a lent device: its return, its loan-out and return snapshots, and misplaced devices.

A loan runs from ``lease_start`` to the end of its ``lease_end`` day (UTC), or until a recorded
return (``returned_at``); after that the device is no longer expected in its room (the classifier
opens no ``device_missing`` for it). ``sweep`` (run by the collector's housekeeping) takes:
- the **loan-out snapshot** when the device is first seen in its room's inventory: identity,
  firmware, port and speeds, and its first health (the room PC's telemetry for it, when it has some);
- the **return snapshot** once the lease has ended or the return is recorded: the device as last seen
  (by any room PC), its last health and the incidents opened on it during the loan.
Each loan (device and ``lease_start``) has at most one of each. ``flags`` lists lent devices seen in
another room than theirs, and devices nobody lent that sit on an enrolled room PC.

The same sweep ends broker accounts with the lease (``lease_accounts``): an enrolled room PC whose
room's loans have all ended or been returned, the last of them after the PC was enrolled, has its
account disabled (reason "lease ended", audited, through ``enroll.disable_agent``); a loan of that
room running again (a new or extended one) enables it again, unless a person disabled it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

from collector import audit, enroll
from collector.registry import NoLoan, Queryable, RegistryError
from collector.store import Store
from collector.store.sqlite import dumps
from common.protocol import format_epoch, now_ts

log = logging.getLogger(__name__)
LEASE_ENDED = "lease ended"
ACTOR = "collector"  # who disables and enables accounts at a lease's end and a new loan, in the audit chain
IDENTITY = ("key", "vid", "pid", "serial", "kind", "vendor", "product", "firmware", "port", "speed", "max_speed")


def _loads(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def ended(loan: dict[str, Any], now: datetime) -> bool:
    """The lease is over: past the end of its ``lease_end`` day (UTC) or returned."""
    if loan.get("returned_at"):
        return True
    end = loan.get("lease_end")
    if not end:
        return False
    try:
        return now.date() > date.fromisoformat(end)
    except ValueError:
        return False


def end_moment(loan: dict[str, Any]) -> datetime | None:
    """When the loan stopped: its return, or the end of its ``lease_end`` day (UTC), whichever came first."""
    ends = []
    if loan.get("lease_end"):
        try:
            ends.append(datetime.combine(date.fromisoformat(loan["lease_end"]), datetime.min.time(), UTC)
                        + timedelta(days=1))
        except ValueError:
            pass
    if loan.get("returned_at"):
        t = _moment(loan["returned_at"])
        if t is not None:
            ends.append(t)
    return min(ends) if ends else None


def _moment(ts: str | None) -> datetime | None:
    try:
        t = datetime.fromisoformat((ts or "").replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _serial(key: str) -> str | None:
    return key.split(":", 2)[2] if key.count(":") >= 2 else None


def _matches(loan_device: str, dev_key: str) -> bool:
    return loan_device == dev_key or loan_device == _serial(dev_key)


def agent_rooms(store: Queryable, agent: str) -> set[str]:
    """The rooms a room PC is in: the registry's, else its enrollment's, else the room it says it is in."""
    rooms = {r["id"] for r in store.query("SELECT id FROM rooms WHERE agent = ?", (agent,))}
    if not rooms:
        rooms = {r["room"] for r in store.query("SELECT room FROM agent_accounts WHERE agent = ?", (agent,))}
    if not rooms:
        row = store.query("SELECT labels FROM agents WHERE agent = ?", (agent,))
        room = _loads(row[0]["labels"], {}).get("room") if row else None
        rooms = {room} if isinstance(room, str) else set()
    return rooms


def _sightings(store: Queryable) -> list[tuple[str, dict[str, Any], dict[str, Any] | None, str | None]]:
    """(agent, device object, its telemetry entry, last_seen) for every device in a room PC's inventory."""
    out = []
    for a in store.query("SELECT agent, inventory, devices, last_seen FROM agents"):
        health = {d.get("key"): d for d in _loads(a["devices"], []) if isinstance(d, dict)}
        for d in _loads(a["inventory"], []):
            if isinstance(d, dict) and isinstance(d.get("key"), str):
                out.append((a["agent"], d, health.get(d["key"]), a["last_seen"]))
    return out


def _snapshot(agent: str | None, dev: dict[str, Any] | None, health: dict[str, Any] | None,
              seen: str | None) -> dict[str, Any]:
    return {"agent": agent, "seen_at": seen,
            "identity": {k: dev.get(k) for k in IDENTITY if k in dev} if dev else None,
            "health": {k: v for k, v in health.items() if k != "key"} if health else None}


def _store(db: Any, loan: dict[str, Any], kind: str, at: str, agent: str | None, room: str | None,
           data: dict[str, Any]) -> bool:
    return bool(db.execute("INSERT OR IGNORE INTO loan_snapshots (device, kind, lease_start, taken_at, agent, room, "
                           "data) VALUES (?,?,?,?,?,?,?)", (loan["device"], kind, loan["lease_start"] or "", at,
                                                            agent, room, dumps(data))).rowcount == 1)


def _last_seen_device(store: Queryable, loan: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(agent, device object, when) of the latest evidence carrying this device."""
    # by key, or by serial (a key vid:pid:serial), matched exactly on both stores (LIKE would ignore case on
    # SQLite only, and read _ and % in a serial as wildcards)
    rows = store.query("SELECT agent, payload, received_at FROM evidence WHERE device = ? OR "
                       "(substr(device, 10, 1) = ':' AND substr(device, 11) = ?) ORDER BY id DESC LIMIT 1",
                       (loan["device"], loan["device"]))
    if not rows:
        return None, None, None
    dev = _loads(rows[0]["payload"], {}).get("device")
    return rows[0]["agent"], dev if isinstance(dev, dict) else None, rows[0]["received_at"]


def sweep(store: Store, now: datetime | None = None,
          settings: enroll.EnrollSettings | None = None) -> dict[str, int]:
    """Take the snapshots that are due, then end or give back broker accounts (``lease_accounts``, with
    ``settings`` or the enrollment settings the service configured); returns how many snapshots of
    each kind were taken."""
    now = now or datetime.now(UTC)
    at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    loans = store.query("SELECT * FROM loans")
    taken = {"out": 0, "return": 0}
    if not loans:
        return taken
    have = {(r["device"], r["kind"], r["lease_start"]) for r in store.query(
        "SELECT device, kind, lease_start FROM loan_snapshots")}
    sightings = _sightings(store)
    rooms_of: dict[str, set[str]] = {}
    with store.tx() as db:
        for loan in loans:
            start = loan["lease_start"] or ""
            over = ended(loan, now)
            seen = [s for s in sightings if _matches(loan["device"], s[1]["key"])]
            if (loan["device"], "out", start) not in have and not over and loan["room"]:
                for agent, dev, health, last in seen:
                    if loan["room"] in rooms_of.setdefault(agent, agent_rooms(store, agent)):
                        taken["out"] += _store(db, loan, "out", at, agent, loan["room"],
                                               _snapshot(agent, dev, health, last))
                        break
            if (loan["device"], "return", start) not in have and over:
                if seen:
                    s_agent, s_dev, health, last = max(seen, key=lambda s: s[3] or "")
                    found: tuple[str | None, dict[str, Any] | None, str | None] = (s_agent, s_dev, last)
                else:
                    found, health = _last_seen_device(store, loan), None
                data = _snapshot(found[0], found[1], health, found[2])
                data["returned_at"] = loan.get("returned_at")
                data["lease_end"] = loan.get("lease_end")
                data["incidents"] = _incidents_during(store, loan, found[1])
                taken["return"] += _store(db, loan, "return", at, found[0], loan["room"], data)
    lease_accounts(store, settings or enroll.current(), now)
    return taken


_accounts_lock = threading.Lock()
_broker_wait: dict[tuple[str, int, str], tuple[float, float]] = {}  # broker -> (retry at, back-off s), monotonic
_agent_wait: dict[str, tuple[float, float]] = {}  # an account the broker refused to change -> the same


def _back_off(waits: dict[Any, tuple[float, float]], key: Any) -> float:
    wait = waits.get(key)
    backoff = min(900.0, 2 * wait[1]) if wait is not None else 60.0
    waits[key] = (time.monotonic() + backoff, backoff)
    return backoff


def lease_accounts(store: Store, settings: enroll.EnrollSettings | None,
                   now: datetime | None = None) -> dict[str, list[str]]:
    """Disable the broker account of every enrolled room PC whose room's loans have all ended or been
    returned, the last of them after the PC was enrolled (reason "lease ended"); enable it again when
    a loan of its room runs again, if it was disabled that way. A room with no loans is left alone.
    Without broker management (``dynsec_username``) nothing is done. A broker that cannot be reached
    is tried again after a back-off (1 min, doubling to 15 min); nothing is marked meanwhile."""
    done: dict[str, list[str]] = {"disabled": [], "enabled": []}
    if settings is None or settings.dynsec is None:
        return done
    now = now or datetime.now(UTC)
    b = settings.dynsec.broker
    target = (b.host, b.port, settings.dynsec.username)
    with _accounts_lock:
        wait = _broker_wait.get(target)
        if wait is not None and time.monotonic() < wait[0]:
            return done
        skip = {a for a, w in _agent_wait.items() if time.monotonic() < w[0]}
        loans = store.query("SELECT * FROM loans WHERE room IS NOT NULL")
        for acct in store.query("SELECT * FROM agent_accounts ORDER BY agent"):
            agent = acct["agent"]
            if agent in skip:
                continue
            rooms = {acct["room"]} | {r["id"] for r in store.query("SELECT id FROM rooms WHERE agent = ?", (agent,))}
            mine = [ln for ln in loans if ln["room"] in rooms]
            if not mine:
                continue
            running = [ln["device"] for ln in mine if not ended(ln, now)]
            detail = {"rooms": sorted(rooms), "loans": sorted(ln["device"] for ln in mine)}
            try:
                if acct["disabled_at"] is None and not running:
                    last = max((m for m in map(end_moment, mine) if m is not None), default=None)
                    since = _moment(acct["enrolled_at"])
                    if last is None or (since is not None and last < since):
                        continue  # enrolled after the last loan ended: the operator's choice stands
                    enroll.disable_agent(store, settings, agent, ACTOR, LEASE_ENDED,
                                         {**detail, "ended_at": last.strftime("%Y-%m-%dT%H:%M:%SZ")})
                    done["disabled"].append(agent)
                    log.info("disabled the broker account of %s: every loan of %s has ended", agent,
                             ", ".join(sorted(rooms)))
                elif (acct["disabled_at"] is not None and running and acct["disabled_by"] == ACTOR
                      and acct["disabled_reason"] == LEASE_ENDED):
                    enroll.enable_agent(store, settings, agent, ACTOR, "loan running",
                                        {**detail, "running": sorted(running)})
                    done["enabled"].append(agent)
                    log.info("enabled the broker account of %s again: %s lent to its room", agent,
                             ", ".join(sorted(running)))
            except enroll.BrokerError as exc:  # the broker is away: no account is changed until it is back
                log.warning("broker accounts are not changed (the next try in %.0f s): %s",
                            _back_off(_broker_wait, target), exc)
                return done
            except enroll.EnrollError as exc:  # this account alone
                log.warning("the broker account of %s was not changed (the next try in %.0f s): %s", agent,
                            _back_off(_agent_wait, agent), exc)
                continue
            _agent_wait.pop(agent, None)
        _broker_wait.pop(target, None)
    return done


def _incidents_during(store: Queryable, loan: dict[str, Any], dev: dict[str, Any] | None) -> list[dict[str, Any]]:
    key = dev.get("key") if dev else loan["device"]
    since = loan["lease_start"] or ""
    return store.query("SELECT id, kind, status, cause, opened_at, resolved_at FROM incidents WHERE device = ? "
                       "AND opened_at >= ? ORDER BY opened_at, id", (key, since))


def record_return(store: Store, device: str, by: str, at: str | None = None) -> dict[str, Any]:
    """The device came back: from ``at`` (now by default) it is no longer expected in its room; the
    return snapshot is taken at once. Audited."""
    at = at or now_ts()
    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError
    except ValueError:
        raise RegistryError(f"loan: returned_at {at!r} must be an RFC 3339 time with its zone, like "
                            "2026-01-05T10:00:00Z") from None
    if when.timestamp() > time.time() + 300:
        raise RegistryError(f"loan: returned_at {at!r} is in the future: record a return when it happened")
    at = format_epoch(when.timestamp())  # stored in UTC, as every time the classifier reads
    with store.tx() as db:
        if db.execute("UPDATE loans SET returned_at = ?, source = 'api', updated_by = ?, updated_at = ? "
                      "WHERE device = ?", (at, by, now_ts(), device)).rowcount != 1:
            raise NoLoan(f"loan: no loan of {device!r}")
        audit.append(db, now_ts(), by, None, "loan.returned", {"device": device, "returned_at": at})
    sweep(store)
    return snapshots(store, device)


def snapshots(store: Queryable, device: str) -> dict[str, Any]:
    """The loan and its loan-out and return snapshots, side by side (the latest loan period first)."""
    keys = {device, _serial(device) or device}
    loan = next(iter(store.query(f"SELECT * FROM loans WHERE device IN ({','.join('?' * len(keys))})", tuple(keys))),
                None)
    rows = store.query(f"SELECT * FROM loan_snapshots WHERE device IN ({','.join('?' * len(keys))}) "
                       "ORDER BY lease_start DESC, taken_at", tuple(keys))
    periods: dict[str, dict[str, Any]] = {}
    for r in rows:
        p = periods.setdefault(r["lease_start"], {"lease_start": r["lease_start"] or None, "out": None,
                                                  "return": None})
        p[r["kind"]] = {"taken_at": r["taken_at"], "agent": r["agent"], "room": r["room"],
                        **_loads(r["data"], {})}
    return {"device": device, "loan": loan, "periods": list(periods.values())}


def flags(store: Queryable, now: datetime | None = None) -> list[dict[str, Any]]:
    """Lent devices seen in another room than theirs; devices nobody lent on an enrolled room PC."""
    now = now or datetime.now(UTC)
    loans = store.query("SELECT * FROM loans")
    enrolled = {r["agent"] for r in store.query("SELECT agent FROM agent_accounts WHERE disabled_at IS NULL")}
    out = []
    for agent, dev, _, last in _sightings(store):
        loan = next((x for x in loans if _matches(x["device"], dev["key"])), None)
        if loan is not None and not ended(loan, now) and loan["room"]:
            rooms = agent_rooms(store, agent)
            if rooms and loan["room"] not in rooms:
                out.append({"flag": "lent_elsewhere", "device": dev["key"], "agent": agent, "seen_at": last,
                            "seen_in": sorted(rooms), "lent_to": {"unit": loan["unit"], "room": loan["room"]}})
        elif (loan is None or ended(loan, now)) and agent in enrolled:
            out.append({"flag": "not_lent" if loan is None else "lease_ended", "device": dev["key"], "agent": agent,
                        "seen_at": last, "seen_in": sorted(agent_rooms(store, agent)), "lent_to": None})
    return out
