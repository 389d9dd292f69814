"""Who is asking, and may they: sessions, API tokens, an optional trusted proxy header; the gate every
request passes; sign-in and sign-out.

The gate (an ASGI middleware, before routing and body parsing):
- every request needs an identity except ``/healthz``, the login page and its assets, and ``/metrics``
  (unless ``metrics_require_token``): API requests without one get 401, pages a redirect to /login;
- every state-changing request must be ``application/json``; one made with a session or the proxy
  header must also come from this site (``Origin``/``Sec-Fetch-Site``) and carry the page's CSRF token
  in ``X-CSRF-Token``. Bearer tokens are not ambient credentials and need neither check.
Role checks are per route (``need``); unit scoping is in the handlers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collector import users
from collector.users import User
from collector.web.views import SafeJSONResponse, WebState

log = logging.getLogger(__name__)
SESSION_COOKIE = "pantau_session"
PUBLIC_PATHS = frozenset({"/healthz", "/login", "/login.js", "/style.css", "/favicon.ico", "/install.sh"})
PUBLIC_PREFIXES = ("/enroll/bundle/",)  # the agent's wheels, for room PCs (collector/web/enroll.py)
OPEN_POSTS = frozenset({"/api/login", "/enroll"})  # no identity needed: the body carries the credential
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY = 64 * 1024
_CSRF_SECRET = secrets.token_bytes(32)  # for proxy-header identities (no session row to keep a token in)
_HASHING = threading.BoundedSemaphore(2)  # argon2 takes 64 MiB a check: a flood of sign-ins cannot take more
_ATTEMPTS = threading.Lock()  # the sign-in limits are checked and the attempt counted under one lock


@dataclass(frozen=True)
class Identity:
    user: User
    via: str  # session | token | proxy
    csrf: str | None = None
    session: str | None = None


@dataclass(frozen=True)
class Caller:
    """Where a request came from, as far as can be believed."""

    remote: str
    https: bool
    trusted_proxy: bool


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _caller(scope: Scope, h: dict[str, str], st: WebState) -> Caller:
    peer = (scope.get("client") or ("", 0))[0]
    trusted = peer in st.settings.proxy_from
    remote = peer
    if trusted and h.get("x-forwarded-for"):
        remote = h["x-forwarded-for"].split(",")[-1].strip()[:64] or peer
    https = scope.get("scheme") == "https" or (trusted and h.get("x-forwarded-proto", "").lower() == "https")
    return Caller(remote, https, trusted)


def _session_cookie(h: dict[str, str]) -> str | None:
    raw = h.get("cookie")
    if not raw:
        return None
    try:
        jar: SimpleCookie = SimpleCookie(raw)
    except CookieError:
        return None
    m = jar.get(SESSION_COOKIE)
    return m.value if m is not None and m.value else None


def proxy_csrf(name: str) -> str:
    return hmac.new(_CSRF_SECRET, name.encode(), hashlib.sha256).hexdigest()[:32]


def resolve(st: WebState, h: dict[str, str], caller: Caller) -> tuple[Identity | None, str | None]:
    """(identity, why not) for one request's headers."""
    auth = h.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "Authorization must be 'Bearer <token>'"
        user = users.token_user(st.reader, token.strip())
        return (Identity(user, "token"), None) if user else (None, "unknown or revoked token")
    header = st.settings.proxy_header
    if header and caller.trusted_proxy and h.get(header.lower()):
        name = h[header.lower()].strip()
        user = users.get(st.reader, name)
        if user is None:
            return None, f"user {name[:64]!r} has no enabled account here"
        return Identity(user, "proxy", proxy_csrf(user.name)), None
    cookie = _session_cookie(h)
    if cookie:
        found = users.session(st.reader, cookie)
        if found:
            return Identity(found[0], "session", found[1], cookie), None
        return None, "the session has ended: sign in again"
    return None, "sign in first"


def same_origin(h: dict[str, str], st: WebState, caller: Caller) -> bool:
    origin = h.get("origin")
    if origin is None:
        return h.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    hosts = [h.get("host", "")]
    if caller.trusted_proxy and h.get("x-forwarded-host"):
        hosts.append(h["x-forwarded-host"].split(",")[0].strip())
    allowed = {f"{s}://{host.lower()}" for host in hosts if host for s in ("http", "https")}
    allowed.update(st.settings.public_origins)
    return origin.lower().rstrip("/") in allowed


def _is_json(h: dict[str, str]) -> bool:
    ctype = h.get("content-type", "").split(";")[0].strip().lower()
    return ctype == "application/json"


class AuthGate:
    def __init__(self, app: ASGIApp, state: WebState) -> None:
        self.app = app
        self.st = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        h = _headers(scope)
        method, path = scope["method"], scope["path"]
        length = h.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await _reply(send, 413, f"the body must be at most {MAX_BODY} bytes")
            return
        caller = _caller(scope, h, self.st)
        ident, why = await anyio.to_thread.run_sync(resolve, self.st, h, caller)
        public = (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
                  or (path == "/metrics" and not self.st.settings.metrics_require_token))
        if method not in SAFE_METHODS:
            if path not in OPEN_POSTS and ident is None:
                await _reply(send, 401, why or "sign in first")
                return
            if not _is_json(h):
                await _reply(send, 403, "a state-changing request must be sent as application/json")
                return
            if (ident is None or ident.via != "token") and not same_origin(h, self.st, caller):
                log.warning("refused %s %s from foreign origin %r (%s)", method, path, h.get("origin"), caller.remote)
                await _reply(send, 403, "cross-site request refused")
                return
            if ident is not None and ident.via != "token" and not (
                    ident.csrf and hmac.compare_digest(h.get("x-csrf-token", ""), ident.csrf)):
                await _reply(send, 403, "missing or wrong X-CSRF-Token (reload the page)")
                return
        elif ident is None and not public:
            if path.startswith("/api/") or path == "/metrics" or scope["method"] != "GET":
                await _reply(send, 401, why or "sign in first")
            else:
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/login"), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
            return
        scope.setdefault("state", {})
        scope["state"]["identity"] = ident
        scope["state"]["caller"] = caller
        await self.app(scope, _limited(receive), send)


def _limited(receive: Receive) -> Receive:
    """Bodies sent without Content-Length (chunked) are held to the same limit."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > MAX_BODY:
                raise HTTPException(413, f"the body must be at most {MAX_BODY} bytes")
        return msg

    return wrapped


async def _reply(send: Send, status: int, message: str) -> None:
    resp = SafeJSONResponse({"error": message}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def state_of(request: Request) -> WebState:
    st: WebState = request.app.state.pantau
    return st


def need(permission: str) -> Callable[[Request], Awaitable[Identity]]:
    """A route dependency: the caller's identity, if their role has ``permission`` (403 otherwise)."""

    async def dep(request: Request) -> Identity:
        ident: Identity | None = getattr(request.state, "identity", None)
        if ident is None:
            raise HTTPException(401, "sign in first")
        if not ident.user.may(permission):
            raise HTTPException(403, f"the {ident.user.role} role may not do this ({permission})")
        return ident

    return dep


Reading = Annotated[Identity, Depends(need("read"))]

# ---------------------------------------------------------------- sign-in, sign-out, who am I

router = APIRouter(tags=["session"])


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str | None = Field(default=None, max_length=128)
    password: str | None = Field(default=None, max_length=1024)
    once: str | None = Field(default=None, max_length=200, description="a one-time sign-in token instead")


@router.post("/api/login", summary="Sign in: sets the session cookie; answers the CSRF token for the page")
def login(body: LoginBody, request: Request) -> SafeJSONResponse:
    st = state_of(request)
    caller: Caller = request.state.caller
    # one-time links are limited per address (one shared name would let anyone block everyone's links)
    name = body.username or (f"(one-time link from {caller.remote})" if body.once else "")
    with _ATTEMPTS:  # check the limits and count this attempt at once: parallel guesses cannot slip past
        wait = users.failures_wait(st.reader, name, caller.remote)
        if wait <= 0:
            attempt = users.record_failure(st.store, name, caller.remote)
    if wait > 0:
        log.warning("login for %r from %s refused: too many failures", name[:64], caller.remote)
        return SafeJSONResponse({"error": f"too many failed sign-ins: try again in {int(wait) + 1} s"},
                                status_code=429, headers={"Retry-After": str(int(wait) + 1)})
    if body.once:
        user = users.use_once(st.store, body.once)
    else:
        with _HASHING:
            user = users.check_password(st.store, name, body.password or "")
    if user is not None:
        users.forget_failure(st.store, attempt)
    else:
        log.warning("failed sign-in for %r from %s", name[:64], caller.remote)
        return SafeJSONResponse({"error": "wrong user name or password, or the link was used already"},
                                status_code=401)
    token, csrf = users.new_session(st.store, user, st.settings.session_s)
    log.info("%s signed in from %s", user.name, caller.remote)
    resp = SafeJSONResponse({"user": user.as_json(), "csrf": csrf})
    resp.set_cookie(SESSION_COOKIE, token, max_age=int(st.settings.session_s), path="/", httponly=True,
                    samesite="lax", secure=caller.https)
    return resp


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


@router.post("/api/logout", summary="Sign out: ends the session")
def logout(body: Empty, request: Request, ident: Reading) -> SafeJSONResponse:
    if ident.session:
        users.end_session(state_of(request).store, ident.session)
    resp = SafeJSONResponse({"ok": True})
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return resp


@router.get("/api/me", summary="The signed-in user, their permissions and the CSRF token for this page")
async def me(ident: Reading) -> dict[str, Any]:
    return {"user": ident.user.as_json(), "csrf": ident.csrf, "via": ident.via, "server_time": time.time()}
