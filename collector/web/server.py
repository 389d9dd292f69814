"""The HTTP server: uvicorn in a thread of the collector process, serving the app in ``app.py``.

uvicorn closes a connection idle *after* a response (keep-alive timeout), but not one that never
sends a request or sends it a byte at a time; ``_guarded_protocol`` adds a deadline for a whole
request and a cap on open connections, and ``raise_nofile_limit`` lifts the soft file limit to the
hard one, so idle connections can neither exhaust file descriptors (the broker connection and the
database need them) nor keep ``/healthz`` from answering.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from collector.web.app import create_app
from collector.web.settings import WebSettings

log = logging.getLogger(__name__)
FD_RESERVE = 256  # descriptors kept for the broker, the database, the notifier and the rest


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # Windows
        return 8192
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def _guarded_protocol(request_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    last_warning = [0.0]

    class GuardedH11(H11Protocol):
        """h11 with a deadline for each whole request and a cap on open connections."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                now = time.monotonic()
                if now - last_warning[0] > 60:
                    last_warning[0] = now
                    log.warning("HTTP: %d connections open, refusing more (http_max_connections)", max_connections)
                transport.abort()
                return
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(request_timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            cycle = self.cycle
            receiving = cycle is None or cycle.response_complete or (cycle.more_body and not cycle.response_started)
            if receiving and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if self.transport is not None:
                super().connection_lost(exc)

    return GuardedH11


class WebServer:
    """The dashboard and API on ``host:port`` (port 0: any free port; ``address`` says which)."""

    def __init__(self, collector: Any, host: str = "127.0.0.1", port: int = 8080,
                 health: Callable[[], list[str]] | None = None, settings: WebSettings | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.settings = settings or WebSettings()
        limit = raise_nofile_limit()
        max_conn = max(16, min(self.settings.max_connections, limit - FD_RESERVE))
        self.app = create_app(collector, self.settings, health)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(1024)
        config = uvicorn.Config(self.app, http=_guarded_protocol(self.settings.request_timeout_s, max_conn),
                                ws="none", lifespan="off", log_config=None, access_log=False, proxy_headers=False,
                                server_header=False, timeout_keep_alive=self.settings.keep_alive_s,
                                timeout_graceful_shutdown=5, backlog=1024,
                                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
        self.tls = tls is not None
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="pantau-http",
                                       daemon=True)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        scheme = "https" if self.tls else "http"
        return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the web server stopped while starting (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError("the web server did not start within 15 s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.app.state.pantau.close()  # open event streams end, so the server stops at once
        if self.thread.ident is None:  # never started
            self.sock.close()
            return
        self.server.should_exit = True
        self.thread.join(10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        self.sock.close()
