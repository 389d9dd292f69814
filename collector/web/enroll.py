"""Enrollment over HTTP: tokens for operators, redemption for room PCs, the installer and its bundle,
disabling an agent's broker account; the lease snapshots and flags (``collector/web/leases.py``).

Room PCs have no account: ``POST /enroll`` (the token is the credential), ``GET /install.sh`` and
``GET /enroll/bundle/<file>`` pass the auth gate without one (``auth.PUBLIC_PATHS``/``PUBLIC_PREFIXES``).
Refused redemptions count as failed sign-ins of the address, so guessing is throttled like passwords.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import FileResponse, Response

from collector import bundle, enroll, users
from collector.web import leases
from collector.web.auth import Identity, need, state_of
from collector.web.views import SafeJSONResponse

log = logging.getLogger(__name__)
router = APIRouter()
router.include_router(leases.router)
Lending = Annotated[Identity, Depends(need("loans"))]
Auditing = Annotated[Identity, Depends(need("audit"))]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _settings() -> enroll.EnrollSettings:
    s = enroll.current()
    if s is None:
        raise HTTPException(503, "enrollment is not set up on this collector (docs/enrollment.md)")
    return s


def commands(url: str | None, fingerprint: str | None, token: str) -> dict[str, str]:
    """What to run on the room PC, for each platform."""
    if not url or not fingerprint:
        return {}
    import ssl

    s = enroll.current()
    pin = ""
    if s is not None and s.cert_file:
        try:
            with open(s.cert_file, encoding="ascii", errors="replace") as fh:
                pin = bundle.spki_pin(ssl.PEM_cert_to_DER_cert(fh.read()))
        except (OSError, ValueError, bundle.BundleError):
            pin = ""
    curl = f"curl -fsSL{'k --pinnedpubkey ' + pin if pin else ''} {url}/install.sh | sudo sh -s -- {token}"
    return {"linux": curl,
            "agent": f"pantau-agent enroll {url} {token} --fingerprint {fingerprint}",
            "windows": f".\\install-agent.ps1 -Collector {url} -Token {token} -Fingerprint {fingerprint}"}


class TokenBody(Body):
    unit: str = Field(min_length=1, max_length=64)
    room: str = Field(min_length=1, max_length=64)
    expires: str = Field(default="24h", max_length=16, description="24h, 90m, 2d ...")
    agent_id: str | None = Field(default=None, max_length=64)


@router.post("/api/enroll/tokens", tags=["enrollment"],
             summary="A single-use enrollment token for a room PC (operator); shown once")
def create_token(body: TokenBody, request: Request, ident: Lending) -> dict[str, Any]:
    st = state_of(request)
    s = _settings()
    try:
        out = enroll.new_token(st.store, body.unit, body.room, enroll.parse_duration(body.expires),
                               ident.user.name, body.agent_id)
        fp = s.fingerprint()
    except enroll.EnrollError as exc:
        raise HTTPException(400, str(exc)) from None
    return {**out, "collector": s.public_url, "fingerprint": fp, "commands": commands(s.public_url, fp, out["token"])}


@router.get("/api/enroll/accounts", tags=["enrollment"], summary="Enrolled room PCs and their broker accounts")
def accounts(request: Request, ident: Auditing) -> list[dict[str, Any]]:
    return enroll.accounts(state_of(request).reader)


class DisableBody(Body):
    reason: str = Field(default="", max_length=500)


@router.post("/api/agents/{agent}/disable", tags=["enrollment"],
             summary="Disable an agent's broker account now: the broker drops its connection (operator)")
def disable(agent: str, body: DisableBody, request: Request, ident: Lending) -> dict[str, Any]:
    try:
        return enroll.disable_agent(state_of(request).store, enroll.current(), agent, ident.user.name, body.reason)
    except enroll.EnrollError as exc:
        raise HTTPException(400, str(exc)) from None


class RedeemBody(Body):
    token: str = Field(max_length=200)
    hostname: str | None = Field(default=None, max_length=253)


@router.post("/enroll", tags=["enrollment"], summary="Redeem an enrollment token (room PCs; no account needed)")
def redeem(body: RedeemBody, request: Request) -> Response:
    st = state_of(request)
    s = _settings()
    remote = request.state.caller.remote
    key = f"(enrollment {remote})"
    wait = users.failures_wait(st.reader, key, remote)
    if wait > 0:
        return SafeJSONResponse({"error": f"too many refused enrollments from this address: try again in "
                                 f"{int(wait) + 1} s"}, status_code=429, headers={"Retry-After": str(int(wait) + 1)})
    try:
        answer = enroll.redeem(st.store, s, body.token, remote)
    except enroll.EnrollError as exc:
        users.record_failure(st.store, key, remote)
        log.warning("enrollment from %s refused: %s", remote, exc)
        return SafeJSONResponse({"error": str(exc)}, status_code=403)
    log.info("room PC %s (%s) enrolled as %s", remote, (body.hostname or "?")[:64], answer["agent_id"])
    return SafeJSONResponse(answer)


@router.get("/install.sh", tags=["enrollment"], summary="The Linux installer (curl ... | sudo sh -s -- TOKEN)",
            response_class=Response)
def install_sh() -> Response:
    s = _settings()
    try:
        fp = s.fingerprint()
        if not s.public_url or not fp:
            raise bundle.BundleError("set public_url (and serve HTTPS) to offer the installer")
        text = bundle.install_sh(s.public_url, fp)
    except (enroll.EnrollError, bundle.BundleError) as exc:
        raise HTTPException(503, str(exc)) from None
    return Response(text, media_type="text/x-shellscript; charset=utf-8")


@router.get("/enroll/bundle/{name}", tags=["enrollment"], summary="The agent's wheels and their index",
            response_class=Response)
def bundle_file(name: str) -> Response:
    s = _settings()
    path = bundle.bundle_file(s.bundle_dir, name)
    if path is None:
        raise HTTPException(404, f"no {name} in the agent bundle (build it: pantau-collector bundle)")
    return FileResponse(path, media_type="text/plain" if name == bundle.INDEX else "application/octet-stream")
