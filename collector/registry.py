"""The lending registry: units (UKE I), their PICs, rooms, and the devices lent to them.

Loaded from TOML (format in docs/registry.md); loans are also editable through the API, and a
loan changed there is the record from then on (a reload of the file leaves it alone). A device
nobody registered shows as *unregistered*.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import date
from typing import Any, Protocol

from collector import audit
from collector.store import Store
from common.config import read_toml

log = logging.getLogger(__name__)


class Queryable(Protocol):
    def query(self, sql: str, args: Iterable[Any] = ...) -> list[Any]: ...


class RegistryError(ValueError):
    pass


def _str(d: dict[str, Any], k: str, where: str, required: bool = True) -> str | None:
    v = d.get(k)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        raise RegistryError(f"registry: {where}.{k} must be a non-empty string")
    return v


def load_toml(store: Store, path: str) -> int:
    return load(store, read_toml(path, "registry", RegistryError))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
LOAN_FIELDS = ("unit", "room", "lease_start", "lease_end", "condition", "note")


def _text(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, date):  # TOML dates written without quotes
        return v.isoformat()
    if not isinstance(v, str):
        raise RegistryError(f"registry: {where} must be a string")
    return v


def load(store: Store, data: dict[str, Any]) -> int:
    """Replace units, rooms and the file's loans with ``data``; returns the number of lent devices in it.

    A loan last changed through the API (``source = 'api'``) is the record: the file does not
    overwrite or remove it (each such device is logged once per load)."""
    units = data.get("units", [])
    if not isinstance(units, list):
        raise RegistryError("registry: units must be an array of tables")
    rows_u, rows_r, rows_l = [], [], []
    for i, u in enumerate(units):
        where = f"units[{i}]"
        if not isinstance(u, dict):
            raise RegistryError(f"registry: {where} must be a table")
        uid = _str(u, "id", where)
        pic = u.get("pic", {}) or {}
        if not isinstance(pic, dict):
            raise RegistryError(f"registry: {where}.pic must be a table")
        rows_u.append((uid, _str(u, "name", where), _text(pic.get("name"), f"{where}.pic.name"),
                       _text(pic.get("email"), f"{where}.pic.email"), _text(pic.get("phone"), f"{where}.pic.phone")))
        for j, r in enumerate(u.get("rooms", []) or []):
            rw = f"{where}.rooms[{j}]"
            if not isinstance(r, dict):
                raise RegistryError(f"registry: {rw} must be a table")
            rid = _str(r, "id", rw)
            rows_r.append((rid, uid, _text(r.get("name"), f"{rw}.name") or rid, _text(r.get("agent"), f"{rw}.agent")))
        for j, d in enumerate(u.get("devices", []) or []):
            dw = f"{where}.devices[{j}]"
            if not isinstance(d, dict):
                raise RegistryError(f"registry: {dw} must be a table")
            rows_l.append((_str(d, "key", dw), uid, *(_text(d.get(k), f"{dw}.{k}") for k in LOAN_FIELDS[1:])))
    with store.tx() as db:
        kept = {r[0] for r in db.execute("SELECT device FROM loans WHERE source = 'api'")}
        db.execute("DELETE FROM units")
        db.execute("DELETE FROM rooms")
        db.execute("DELETE FROM loans WHERE source = 'file'")
        db.executemany("INSERT INTO units (id, name, pic_name, pic_email, pic_phone) VALUES (?,?,?,?,?)", rows_u)
        db.executemany("INSERT INTO rooms (id, unit, name, agent) VALUES (?,?,?,?)", rows_r)
        db.executemany("INSERT INTO loans (device, unit, room, lease_start, lease_end, condition, note, source) "
                       "VALUES (?,?,?,?,?,?,?,'file')", [r for r in rows_l if r[0] not in kept])
    for r in rows_l:
        if r[0] in kept:
            log.info("registry: loan of %s was changed through the API; the file's entry is not applied", r[0])
    return len(rows_l)


def _loan_row(db: Any, device: str) -> dict[str, Any]:
    cur = db.execute("SELECT * FROM loans WHERE device = ?", (device,))
    return dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))


class NoLoan(RegistryError):
    """No loan of the device named."""


def update_loan(store: Store, device: str, changes: dict[str, Any], by: str, at: str) -> dict[str, Any]:
    """Create a loan or change only the fields in ``changes`` (None clears one); audited as ``by``."""
    if not isinstance(device, str) or not device.strip() or len(device) > 200 or _CONTROL.search(device):
        raise RegistryError("loan: device must be a non-empty key (vid:pid:serial) or serial, without control "
                            "characters")
    unknown = set(changes) - set(LOAN_FIELDS)
    if unknown:
        raise RegistryError(f"loan: unknown field {sorted(unknown)[0]!r}")
    for k, v in changes.items():
        if v is not None and (not isinstance(v, str) or len(v) > 500 or _CONTROL.search(v.replace("\n", " "))):
            raise RegistryError(f"loan: {k} must be a string of at most 500 characters without control "
                                "characters, or null")
    if "unit" in changes and not changes["unit"]:
        raise RegistryError("loan: unit cannot be empty")
    for k in ("lease_start", "lease_end"):
        if changes.get(k):
            try:
                date.fromisoformat(changes[k])
            except ValueError:
                raise RegistryError(f"loan: {k} must be a date like 2026-01-05") from None
    with store.tx() as db:
        cur = db.execute(f"SELECT {', '.join(LOAN_FIELDS)} FROM loans WHERE device = ?", (device,))
        row = cur.fetchone()
        old = dict(zip(LOAN_FIELDS, row, strict=True)) if row else None
        new = {**(old or dict.fromkeys(LOAN_FIELDS)), **changes}
        if not new["unit"]:
            raise RegistryError("loan: a new loan needs its unit")
        if new["lease_start"] and new["lease_end"] and new["lease_end"] < new["lease_start"]:
            raise RegistryError(f"loan: lease_end {new['lease_end']} is before lease_start {new['lease_start']}")
        if not db.execute("SELECT 1 FROM units WHERE id = ?", (new["unit"],)).fetchone():
            raise RegistryError(f"loan: unit {new['unit']!r} is not registered")
        if new["room"] is not None:
            room = db.execute("SELECT unit FROM rooms WHERE id = ?", (new["room"],)).fetchone()
            if room is None:
                raise RegistryError(f"loan: room {new['room']!r} is not registered")
            if room[0] != new["unit"]:
                raise RegistryError(f"loan: room {new['room']!r} belongs to unit {room[0]!r}, not {new['unit']!r}")
        changed = {k: [(old or {}).get(k), new[k]] for k in LOAN_FIELDS if (old or {}).get(k) != new[k]}
        if old is not None and not changed:  # nothing to record: no write, no audit entry
            return _loan_row(db, device)
        if old is not None and "lease_start" in changed:  # a new lease period: the device is lent again
            back = db.execute("SELECT returned_at FROM loans WHERE device = ?", (device,)).fetchone()
            if back and back[0]:
                db.execute("UPDATE loans SET returned_at = NULL WHERE device = ?", (device,))
                changed["returned_at"] = [back[0], None]
        db.execute("INSERT INTO loans (device, unit, room, lease_start, lease_end, condition, note, source, "
                   "updated_by, updated_at) VALUES (?,?,?,?,?,?,?,'api',?,?) ON CONFLICT(device) DO UPDATE SET "
                   "unit=excluded.unit, room=excluded.room, lease_start=excluded.lease_start, "
                   "lease_end=excluded.lease_end, condition=excluded.condition, note=excluded.note, source='api', "
                   "updated_by=excluded.updated_by, updated_at=excluded.updated_at",
                   (device, *(new[k] for k in LOAN_FIELDS), by, at))
        audit.append(db, at, by, None, "loan.created" if old is None else "loan.updated",
                     {"device": device, "changed": changed})
    return store.query("SELECT * FROM loans WHERE device = ?", (device,))[0]


def lookup(store: Queryable, device_key: str, agent: str | None) -> dict[str, Any]:
    """Unit, room and PIC for a device: by its loan (key, else serial), else by the registered room of
    the agent that saw it, else by the ``unit`` and ``room`` labels that agent reports."""
    serial = device_key.split(":", 2)[2] if device_key.count(":") >= 2 else None
    rows = store.query("SELECT * FROM loans WHERE device = ? OR device = ?", (device_key, serial or device_key))
    loan = rows[0] if rows else None
    unit_id = loan["unit"] if loan else None
    room_id = loan["room"] if loan else None
    if room_id is None and agent:
        r = store.query("SELECT id, unit FROM rooms WHERE agent = ?", (agent,))
        if r:
            room_id = r[0]["id"]
            unit_id = unit_id or r[0]["unit"]
    if unit_id is None and agent:
        row = store.query("SELECT labels FROM agents WHERE agent = ?", (agent,))
        labels = json.loads(row[0]["labels"]) if row and row[0]["labels"] else {}
        unit_id = labels.get("unit") if isinstance(labels.get("unit"), str) else None
        room_id = room_id or (labels.get("room") if isinstance(labels.get("room"), str) else None)
    unit = store.query("SELECT * FROM units WHERE id = ?", (unit_id,)) if unit_id else []
    room = store.query("SELECT * FROM rooms WHERE id = ?", (room_id,)) if room_id else []
    u = unit[0] if unit else None
    return {
        "registered": loan is not None,
        "unit": u["id"] if u else unit_id,
        "unit_name": u["name"] if u else None,
        "room": room[0]["id"] if room else room_id,
        "room_name": room[0]["name"] if room else None,
        "pic": {"name": u["pic_name"], "email": u["pic_email"], "phone": u["pic_phone"]} if u else None,
        "lease_end": loan["lease_end"] if loan else None,
        "condition_at_loan": loan["condition"] if loan else None,
    }
