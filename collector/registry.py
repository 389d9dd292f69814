"""The lending registry: units (UKE I), their PICs, rooms, and the devices lent to them.

Loaded from TOML (format in docs/registry.md) and editable through the API. A device
nobody registered shows as *unregistered*.
"""

from __future__ import annotations

import json
from typing import Any

from collector.store.sqlite import SqliteStore
from common.config import read_toml


class RegistryError(ValueError):
    pass


def _str(d: dict[str, Any], k: str, where: str, required: bool = True) -> str | None:
    v = d.get(k)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        raise RegistryError(f"registry: {where}.{k} must be a non-empty string")
    return v


def load_toml(store: SqliteStore, path: str) -> int:
    return load(store, read_toml(path, "registry", RegistryError))


def load(store: SqliteStore, data: dict[str, Any]) -> int:
    """Replace the registry with ``data``; returns the number of lent devices."""
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
        rows_u.append((uid, _str(u, "name", where), pic.get("name"), pic.get("email"), pic.get("phone")))
        for j, r in enumerate(u.get("rooms", []) or []):
            rw = f"{where}.rooms[{j}]"
            rows_r.append((_str(r, "id", rw), uid, r.get("name") or r["id"], r.get("agent")))
        for j, d in enumerate(u.get("devices", []) or []):
            dw = f"{where}.devices[{j}]"
            rows_l.append((_str(d, "key", dw), uid, d.get("room"), d.get("lease_start"), d.get("lease_end"),
                           d.get("condition"), d.get("note")))
    with store.tx() as db:
        db.execute("DELETE FROM units")
        db.execute("DELETE FROM rooms")
        db.execute("DELETE FROM loans")
        db.executemany("INSERT INTO units VALUES (?,?,?,?,?)", rows_u)
        db.executemany("INSERT INTO rooms VALUES (?,?,?,?)", rows_r)
        db.executemany("INSERT INTO loans VALUES (?,?,?,?,?,?,?)", rows_l)
    return len(rows_l)


def upsert_loan(store: SqliteStore, body: dict[str, Any]) -> dict[str, Any]:
    key = _str(body, "device", "loan")
    unit = _str(body, "unit", "loan")
    if not store.query("SELECT 1 FROM units WHERE id = ?", (unit,)):
        raise RegistryError(f"registry: unit {unit!r} is not registered")
    with store.tx() as db:
        db.execute("INSERT INTO loans VALUES (?,?,?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET unit=excluded.unit, "
                   "room=excluded.room, lease_start=excluded.lease_start, lease_end=excluded.lease_end, "
                   "condition=excluded.condition, note=excluded.note",
                   (key, unit, body.get("room"), body.get("lease_start"), body.get("lease_end"),
                    body.get("condition"), body.get("note")))
    return lookup(store, key or "", None)


def lookup(store: SqliteStore, device_key: str, agent: str | None) -> dict[str, Any]:
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
