"""The web application: FastAPI routes, the auth gate, security headers, the dashboard's files,
``/healthz``, ``/metrics`` and the generated OpenAPI document at ``/api/openapi.json``."""

from __future__ import annotations

import http
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collector.web import api, auth, enroll, reads
from collector.web.metrics import health_reasons, metrics_text
from collector.web.settings import WebSettings
from collector.web.views import SafeJSONResponse, WebState
from common import __version__

log = logging.getLogger(__name__)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/login": ("login.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/login.js": ("login.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8"),
          "/chart.js": ("chart.js", "text/javascript; charset=utf-8"),
          "/i18n.js": ("i18n.js", "text/javascript; charset=utf-8")}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                names = {k.lower() for k, _ in msg.get("headers", [])}
                msg["headers"] = [*msg.get("headers", []), *((k, v) for k, v in SECURITY_HEADERS if k not in names)]
            await send(msg)

        await self.app(scope, receive, send_with_headers)


def _static(name: str) -> bytes:
    return resources.files("collector.web").joinpath("static", name).read_bytes()


def _page(body: bytes, ctype: str) -> Callable[[], Any]:
    async def page() -> Response:
        return Response(body, media_type=ctype)

    return page


def _one_line(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "invalid request"
    e = errs[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    if e.get("type") == "json_invalid":
        return "the body is not valid JSON"
    return f"{where}: {e.get('msg', 'invalid')}"


_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _documented(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document as the server answers: errors are ``{"error": "one line"}`` with 400 for a bad
    parameter or body (never 422), 401 without an identity, 403 for what the role, the origin, the content
    type or a missing X-CSRF-Token refuses, 413 for a body over 64 KiB, 429 for sign-in tries; and how to
    authenticate (a bearer token or the session cookie)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = doc.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                "session": {"type": "apiKey", "in": "cookie", "name": auth.SESSION_COOKIE}}
    doc["security"] = [{"bearer": []}, {"session": []}]
    for path, ops in doc.get("paths", {}).items():
        public = (path in auth.PUBLIC_PATHS or path.startswith(auth.PUBLIC_PREFIXES)
                  or (path == "/metrics" and not app.state.pantau.settings.metrics_require_token))
        for method, op in ops.items():
            answers = op.setdefault("responses", {})
            answers.pop("422", None)
            if op.get("parameters") or op.get("requestBody"):
                answers["400"] = {"description": "a bad parameter or body, said in one line", **_ERROR}
            if public or path in auth.OPEN_POSTS:
                op["security"] = []
            else:
                answers["401"] = {"description": "no session or token, or one that ended", **_ERROR}
                answers["403"] = {"description": "the role may not; or, for a change, not application/json, "
                                                 "another site, or no X-CSRF-Token with a session", **_ERROR}
            if method in ("post", "put", "patch", "delete"):
                answers["413"] = {"description": "a body over 64 KiB", **_ERROR}
            if "{" in path:
                answers["404"] = {"description": "no such thing, or one of another unit (a PIC)", **_ERROR}
            if path == "/api/login":
                answers["429"] = {"description": "too many failed tries: wait (Retry-After)", **_ERROR}
    app.openapi_schema = doc
    return doc


def create_app(collector: Any, settings: WebSettings | None = None,
               health: Callable[[], list[str]] | None = None) -> FastAPI:
    st = WebState(collector, settings or WebSettings(), health)
    app = FastAPI(title="Pantau collector", version=__version__, openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None, default_response_class=SafeJSONResponse,
                  description="Sign in with POST /api/login (a session cookie; send X-CSRF-Token from /api/me on "
                              "state-changing requests) or send `Authorization: Bearer <token>`. State-changing "
                              "requests must be application/json.")
    app.state.pantau = st
    app.include_router(auth.router)
    app.include_router(api.router)
    app.include_router(reads.router)
    app.include_router(enroll.router)  # enrollment, the agent installer, lease snapshots (collector/web/enroll.py)

    app.openapi = lambda: _documented(app)  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = str(exc.detail) if exc.detail != http.HTTPStatus(exc.status_code).phrase else ""
        return SafeJSONResponse({"error": detail or http.HTTPStatus(exc.status_code).phrase.lower()},
                                status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return SafeJSONResponse({"error": _one_line(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return SafeJSONResponse({"error": "internal error"}, status_code=500)

    health_limiter = anyio.CapacityLimiter(4)  # /healthz never queues behind slow API requests

    @app.get("/healthz", tags=["service"], summary="200 {ok: true}, or 503 with the reasons")
    async def healthz() -> Response:
        reasons = await anyio.to_thread.run_sync(health_reasons, st, limiter=health_limiter)
        if reasons:
            return SafeJSONResponse({"ok": False, "reasons": reasons}, status_code=503)
        return SafeJSONResponse({"ok": True})

    @app.get("/metrics", tags=["service"], summary="Prometheus text exposition", response_class=Response)
    def metrics() -> Response:
        return Response(metrics_text(st), media_type=CONTENT_TYPE_LATEST)

    for path, (name, ctype) in STATIC.items():
        app.add_api_route(path, _page(_static(name), ctype), methods=["GET"], include_in_schema=False)

    app.add_middleware(GZipMiddleware, minimum_size=1024)  # text/event-stream is left alone
    app.add_middleware(auth.AuthGate, state=st)
    app.add_middleware(SecurityHeaders)
    return app
