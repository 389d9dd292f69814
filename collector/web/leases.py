"""Leases over HTTP: a device's loan-out and return snapshots, recording a return, misplaced devices."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from collector import leases
from collector.registry import NoLoan, RegistryError
from collector.web.auth import Identity, Reading, need, state_of
from collector.web.views import sees_unit

router = APIRouter(tags=["leases"])
Lending = Annotated[Identity, Depends(need("loans"))]


class ReturnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    returned_at: str | None = Field(default=None, max_length=40, description="RFC 3339; default: now")


@router.get("/api/loans/{key}/snapshots", summary="A lent device's loan-out and return snapshots, side by side "
            "(the device page shows them)")
def device_snapshots(key: str, request: Request, ident: Reading) -> dict[str, Any]:
    r = state_of(request).reader
    out = leases.snapshots(r, key)
    loan = out["loan"]
    if ident.user.scoped and (loan is None or not sees_unit(ident.user, loan["unit"])):
        raise HTTPException(404, f"no device {key}")
    return out


@router.post("/api/loans/{device}/return", summary="Record that a lent device came back (operator): no longer "
             "expected in its room from then on; the return snapshot is taken")
def record_return(device: str, body: ReturnBody, request: Request, ident: Lending) -> dict[str, Any]:
    try:
        return leases.record_return(state_of(request).store, device, ident.user.name, body.returned_at)
    except RegistryError as exc:
        raise HTTPException(404 if isinstance(exc, NoLoan) else 400, str(exc)) from None


@router.get("/api/leases/flags", summary="Lent devices seen in another room; unlent devices on enrolled room PCs")
def lease_flags(request: Request, ident: Reading) -> list[dict[str, Any]]:
    rows = leases.flags(state_of(request).reader)
    if not ident.user.scoped:
        return rows
    unit = ident.user.unit
    mine = {r["agent"] for r in state_of(request).reader.query(
        "SELECT agent FROM agent_accounts WHERE unit = ? UNION SELECT agent FROM rooms WHERE unit = ?", (unit, unit))}
    return [f for f in rows if f["agent"] in mine or (f["lent_to"] or {}).get("unit") == unit]
