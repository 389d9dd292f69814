"""The JSON API: rooms, incidents and their decisions, the registry, handling reports, accounts.

A PIC sees only their unit: lists never hold another unit's rows, whatever the query says, and
asking for another unit's incident, room or device by id answers 404 — as if it did not exist.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from collector import audit, queries, registry, users
from collector.incidents import IncidentError
from collector.policy import CAUSES
from collector.web.auth import Identity, Reading, need, state_of
from collector.web.views import agent_view, incident_view, sees_unit, visible_incident
from common.protocol import now_ts

log = logging.getLogger(__name__)
router = APIRouter()

Overriding = Annotated[Identity, Depends(need("override"))]
Acknowledging = Annotated[Identity, Depends(need("acknowledge"))]
Commenting = Annotated[Identity, Depends(need("comment"))]
Handling = Annotated[Identity, Depends(need("handling"))]
Lending = Annotated[Identity, Depends(need("loans"))]
Auditing = Annotated[Identity, Depends(need("audit"))]
Administering = Annotated[Identity, Depends(need("users"))]
Registering = Annotated[Identity, Depends(need("registry"))]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _unit_filter(ident: Identity, unit: str | None) -> str | None:
    """The unit a list is limited to: a PIC's own, always; else the query's, if any."""
    return ident.user.unit if ident.user.scoped else unit


# ---------------------------------------------------------------- rooms and incidents


@router.get("/api/agents", tags=["fleet"], summary="Room PCs: state, labels, inventory, clock offset")
def agents(request: Request, ident: Reading, unit: str | None = None) -> list[dict[str, Any]]:
    r = state_of(request).reader
    rows = [agent_view(r, row) for row in r.query("SELECT * FROM agents ORDER BY agent")]
    only = _unit_filter(ident, unit)
    return [a for a in rows if only is None or a["unit"] == only]


class OverrideBody(Body):
    cause: str = Field(description=f"one of {', '.join(CAUSES)}")
    reason: str = Field(min_length=1, max_length=1000)


@router.post("/api/incidents/{id}/override", tags=["incidents"],
             summary="Decide the cause (operator); the computed cause is kept beside it")
def override(id: str, body: OverrideBody, request: Request, ident: Overriding) -> dict[str, Any]:
    st = state_of(request)
    try:
        row = st.collector.book.override(id, body.cause, body.reason, ident.user.name, now_ts())
    except KeyError:
        raise HTTPException(404, f"no incident {id}") from None
    except IncidentError as exc:
        raise HTTPException(400, str(exc)) from None
    return incident_view(st.reader, row)


@router.post("/api/incidents/{id}/ack", tags=["incidents"], summary="Acknowledge an incident (operator)")
def acknowledge(id: str, body: Body, request: Request, ident: Acknowledging) -> dict[str, Any]:
    st = state_of(request)
    try:
        row = st.collector.book.acknowledge(id, ident.user.name, now_ts())
    except KeyError:
        raise HTTPException(404, f"no incident {id}") from None
    except IncidentError as exc:
        raise HTTPException(400, str(exc)) from None
    return incident_view(st.reader, row)


class CommentBody(Body):
    text: str = Field(min_length=1, max_length=2000)


@router.post("/api/incidents/{id}/comment", tags=["incidents"],
             summary="Comment on an incident (a PIC: their unit's only); kept in the audit chain")
def comment(id: str, body: CommentBody, request: Request, ident: Commenting) -> dict[str, Any]:
    st = state_of(request)
    if visible_incident(st.reader, ident.user, id) is None:
        raise HTTPException(404, f"no incident {id}")
    text = body.text.strip()
    if not text:
        raise HTTPException(400, "a comment needs some text")
    with st.store.tx() as db:
        audit.append(db, now_ts(), ident.user.name, id, "commented", {"text": text})
    return {"incident": id, "history": queries.audit_trail(st.reader, id)}


# ---------------------------------------------------------------- handling reports


class HandlingBody(Body):
    agent: str = Field(min_length=1, max_length=64)
    device: str = Field(min_length=1, max_length=200)
    note: str = Field(min_length=1, max_length=500)


@router.post("/api/handling", tags=["fleet"],
             summary="Record a handling report against a device (a PIC: in their unit only)")
def handling(body: HandlingBody, request: Request, ident: Handling) -> dict[str, Any]:
    st = state_of(request)
    if ident.user.scoped:  # both the room PC and the device must be the PIC's unit's
        rows = st.reader.query("SELECT * FROM agents WHERE agent = ?", (body.agent,))
        room_unit = agent_view(st.reader, rows[0])["unit"] if rows else None
        device_unit = registry.lookup(st.reader, body.device, body.agent)["unit"]
        if not (sees_unit(ident.user, room_unit) and sees_unit(ident.user, device_unit)):
            raise HTTPException(404, f"no device {body.device} at {body.agent}")
    try:
        out: dict[str, Any] = st.collector.report_handling(body.agent, body.device, body.note, ident.user.name)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    return out


# ---------------------------------------------------------------- the registry


@router.get("/api/units", tags=["registry"], summary="Units and their PICs (a PIC: their own)")
def units(request: Request, ident: Reading) -> list[dict[str, Any]]:
    rows = state_of(request).reader.query("SELECT * FROM units ORDER BY id")
    return [u for u in rows if sees_unit(ident.user, u["id"])]


@router.get("/api/rooms", tags=["registry"], summary="Registered rooms and their room PCs (a PIC: their unit's)")
def rooms(request: Request, ident: Reading, unit: str | None = None) -> list[dict[str, Any]]:
    rows = state_of(request).reader.query("SELECT * FROM rooms ORDER BY unit, id")
    only = _unit_filter(ident, unit)
    return [r for r in rows if only is None or r["unit"] == only]


@router.get("/api/loans", tags=["registry"], summary="Lent devices (a PIC: their unit's)")
def loans(request: Request, ident: Reading, unit: str | None = None) -> list[dict[str, Any]]:
    rows = state_of(request).reader.query("SELECT * FROM loans ORDER BY unit, device")
    only = _unit_filter(ident, unit)
    return [r for r in rows if only is None or r["unit"] == only]


@router.get("/api/loans/{device}", tags=["registry"], summary="One loan (a PIC: their unit's only)")
def loan(device: str, request: Request, ident: Reading) -> dict[str, Any]:
    rows = state_of(request).reader.query("SELECT * FROM loans WHERE device = ?", (device,))
    if not rows or not sees_unit(ident.user, rows[0]["unit"]):
        raise HTTPException(404, f"no loan of {device}")
    return rows[0]


class LoanBody(Body):
    device: str = Field(min_length=1, max_length=200, description="device key (vid:pid:serial) or serial")
    unit: str | None = Field(default=None, max_length=64)
    room: str | None = Field(default=None, max_length=64)
    lease_start: str | None = Field(default=None, max_length=10)
    lease_end: str | None = Field(default=None, max_length=10)
    condition: str | None = Field(default=None, max_length=500)
    note: str | None = Field(default=None, max_length=500)


@router.post("/api/loans", tags=["registry"],
             summary="Create a loan, or change only the fields given (null clears one); audited")
def save_loan(body: LoanBody, request: Request, ident: Lending) -> dict[str, Any]:
    changes = {k: getattr(body, k) for k in body.model_fields_set if k != "device"}
    try:
        return registry.update_loan(state_of(request).store, body.device, changes, ident.user.name, now_ts())
    except registry.RegistryError as exc:
        raise HTTPException(400, str(exc)) from None


@router.post("/api/registry/reload", tags=["registry"],
             summary="Reload the registry file (admin); loans changed through the API are kept")
def reload_registry(body: Body, request: Request, ident: Registering) -> dict[str, Any]:
    st = state_of(request)
    path = st.settings.registry_path
    if not path:
        raise HTTPException(409, "no registry file is configured (registry / PANTAU_REGISTRY)")
    try:
        n = registry.load_toml(st.store, path)
    except registry.RegistryError as exc:
        raise HTTPException(400, str(exc)) from None
    with st.store.tx() as db:
        audit.append(db, now_ts(), ident.user.name, None, "registry.reloaded", {"file": path, "devices": n})
    return {"devices_in_file": n}


# ---------------------------------------------------------------- inspection


@router.get("/api/dead-letters", tags=["inspection"], summary="Rejected messages (not for a PIC: not per unit)")
def dead_letters(request: Request, ident: Reading) -> list[dict[str, Any]]:
    if ident.user.scoped:
        raise HTTPException(403, "rejected messages are not attributed to a unit")
    return state_of(request).reader.query("SELECT id, received_at, topic, reason, detail FROM dead_letter "
                                          "ORDER BY id DESC LIMIT 200")


@router.get("/api/audit/verify", tags=["inspection"],
            summary="Check the keyed audit chain (in a separate process, on a snapshot; one at a time)")
def verify_audit(request: Request, ident: Auditing) -> dict[str, Any]:
    st = state_of(request)
    if not st.verify_lock.acquire(blocking=False):
        raise HTTPException(429, "a verification is already running: try again shortly")
    try:
        key_file = st.settings.audit_key_file or audit.key_file_for(st.store.path)
        db = st.store.path if getattr(st.store, "dialect", "sqlite") != "sqlite" else os.path.abspath(st.store.path)
        proc = subprocess.run([sys.executable, "-m", "collector.audit", "-", key_file], capture_output=True,
                              text=True, timeout=600, check=False, env={**os.environ, "PANTAU_AUDIT_DB": db})
    finally:
        st.verify_lock.release()
    try:
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.error("audit verification failed: %s", proc.stderr.strip()[-500:])
        raise HTTPException(500, "the verification could not run") from None
    if "error" in out:
        raise HTTPException(500, out["error"])
    return out


# ---------------------------------------------------------------- accounts


@router.get("/api/users", tags=["accounts"], summary="Accounts (admin)")
def list_users(request: Request, ident: Administering) -> list[dict[str, Any]]:
    return users.listing(state_of(request).reader)


class UserBody(Body):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "operator", "pic", "viewer"]
    unit: str | None = Field(default=None, max_length=64)
    password: str | None = Field(default=None, max_length=1024)


@router.post("/api/users", tags=["accounts"], summary="Add an account (admin)")
def add_user(body: UserBody, request: Request, ident: Administering) -> dict[str, Any]:
    try:
        return users.add(state_of(request).store, body.name, body.role, body.unit, body.password,
                         ident.user.name).as_json()
    except users.UserError as exc:
        raise HTTPException(400, str(exc)) from None


@router.post("/api/users/{name}/disable", tags=["accounts"], summary="Disable an account (admin); ends its sessions")
def disable_user(name: str, body: Body, request: Request, ident: Administering) -> dict[str, Any]:
    if name == ident.user.name:
        raise HTTPException(400, "you cannot disable your own account")
    try:
        users.disable(state_of(request).store, name, ident.user.name)
    except users.UserError as exc:
        raise HTTPException(404, str(exc)) from None
    return {"name": name, "disabled": True}


class TokenBody(Body):
    label: str = Field(default="api", max_length=120)


@router.post("/api/users/{name}/tokens", tags=["accounts"],
             summary="Create an API token for scripts (admin); shown once, stored only as a hash")
def add_token(name: str, body: TokenBody, request: Request, ident: Administering) -> dict[str, Any]:
    try:
        token = users.new_token(state_of(request).store, name, body.label, ident.user.name)
    except users.UserError as exc:
        raise HTTPException(404, str(exc)) from None
    return {"name": name, "token": token, "use": "Authorization: Bearer <token>"}
