"""HTTP: the dashboard, a JSON API (described in /api/openapi.json) and /metrics.

The standard library's threading server is enough for central IT's handful of users and
keeps the collector free of a web framework; it binds where PANTAU_HTTP says
(127.0.0.1:8080 by default).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from collector import audit
from collector.incidents import IncidentError
from collector.ingest import Collector
from collector.registry import RegistryError, lookup, upsert_loan
from common.protocol import now_ts

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024


def incident_view(c: Collector, row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["evidence"] = json.loads(row["evidence"])
    out["summaries"] = json.loads(row.get("summaries") or "{}")
    out["registry"] = lookup(c.store, row["device"], row["agent"])
    out["effective_cause"] = row["decided_cause"] or row["cause"]
    out["effective_responsible"] = row["decided_responsible"] or row["responsible"]
    return out


def metrics_text(c: Collector) -> str:
    m = c.metrics()
    lines = [
        "# HELP pantau_messages_received_total Messages received from the broker.",
        "# TYPE pantau_messages_received_total counter",
        f"pantau_messages_received_total {m['received']}",
        "# HELP pantau_messages_rejected_total Messages rejected by validation, by reason.",
        "# TYPE pantau_messages_rejected_total counter",
    ]
    lines += [f'pantau_messages_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(m["rejected"].items())]
    lines += [
        "# HELP pantau_messages_stored_total Valid messages committed to the store (duplicates excluded).",
        "# TYPE pantau_messages_stored_total counter",
        f"pantau_messages_stored_total {m['stored']}",
        "# HELP pantau_messages_duplicate_total Duplicates (agent, boot, seq) applied once.",
        "# TYPE pantau_messages_duplicate_total counter",
        f"pantau_messages_duplicate_total {m['duplicates']}",
        "# HELP pantau_ingest_lag_seconds Receive time minus the agent's ts, last message.",
        "# TYPE pantau_ingest_lag_seconds gauge",
        f"pantau_ingest_lag_seconds {m['lag_s']:.3f}",
        "# HELP pantau_store_buffer_depth Time-series points waiting for the external store.",
        "# TYPE pantau_store_buffer_depth gauge",
        f"pantau_store_buffer_depth {m['buffer_depth']}",
        "# HELP pantau_dead_letters Rejected messages kept for inspection.",
        "# TYPE pantau_dead_letters gauge",
        f"pantau_dead_letters {m['dead_letters']}",
    ]
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    collector: Collector
    server_version = "pantau"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http %s", fmt % args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _error(self, code: int, msg: str) -> None:
        self._json(code, {"error": msg})

    def _body(self) -> dict[str, Any] | None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self._error(413 if n > MAX_BODY else 400, "body missing or too large")
            return None
        try:
            data = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            self._error(400, "body is not JSON")
            return None
        if not isinstance(data, dict):
            self._error(400, "body must be a JSON object")
            return None
        return data

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        c = self.collector
        path = url.path.rstrip("/") or "/"
        try:
            if path == "/":
                self._send(200, _static("index.html"), "text/html; charset=utf-8")
            elif path in ("/app.js", "/style.css"):
                ctype = "text/javascript" if path.endswith(".js") else "text/css"
                self._send(200, _static(path[1:]), f"{ctype}; charset=utf-8")
            elif path == "/metrics":
                self._send(200, metrics_text(c).encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/healthz":
                self._json(200, {"ok": True})
            elif path == "/api/openapi.json":
                self._send(200, _static("openapi.json"), "application/json")
            elif path == "/api/agents":
                rows = c.store.query("SELECT * FROM agents ORDER BY agent")
                for r in rows:
                    for k in ("labels", "inventory", "host", "devices"):
                        r[k] = json.loads(r[k]) if r.get(k) else None
                if q.get("unit"):
                    rows = [r for r in rows if (r["labels"] or {}).get("unit") == q["unit"]]
                self._json(200, rows)
            elif path == "/api/incidents":
                sql, args = "SELECT * FROM incidents WHERE 1=1", []
                if q.get("status"):
                    sql += " AND status = ?"
                    args.append(q["status"])
                elif not q.get("all"):
                    sql += " AND status != 'withdrawn'"
                rows = [incident_view(c, r) for r in c.store.query(sql + " ORDER BY opened_at DESC", args)]
                if q.get("unit"):
                    rows = [r for r in rows if r["registry"]["unit"] == q["unit"]]
                self._json(200, rows)
            elif path.startswith("/api/incidents/"):
                iid = path.split("/")[3]
                row = c.book.get(iid)
                if row is None:
                    self._error(404, f"no incident {iid}")
                    return
                view = incident_view(c, row)
                view["history"] = c.store.query("SELECT at, actor, action, detail FROM audit WHERE incident = ? "
                                                "ORDER BY id", (iid,))
                self._json(200, view)
            elif path == "/api/units":
                self._json(200, c.store.query("SELECT * FROM units ORDER BY id"))
            elif path == "/api/loans":
                self._json(200, c.store.query("SELECT * FROM loans ORDER BY unit, device"))
            elif path == "/api/dead-letters":
                rows = c.store.query("SELECT id, received_at, topic, reason, detail FROM dead_letter "
                                     "ORDER BY id DESC LIMIT 200")
                self._json(200, rows)
            elif path == "/api/audit/verify":
                with c.store.lock:
                    n, broken, why = audit.verify(c.store.db)
                self._json(200, {"entries": n, "first_broken": broken, "message": why})
            else:
                self._error(404, "not found")
        except Exception:
            log.exception("GET %s failed", self.path)
            self._error(500, "internal error")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        parts = path.split("/")
        body = self._body()
        if body is None:
            return
        c = self.collector
        try:
            if len(parts) == 5 and parts[:3] == ["", "api", "incidents"] and parts[4] in ("override", "ack"):
                if parts[4] == "override":
                    row = c.book.override(parts[3], str(body.get("cause", "")), str(body.get("reason", "")),
                                          str(body.get("by", "")), now_ts())
                else:
                    row = c.book.acknowledge(parts[3], str(body.get("by", "")), now_ts())
                self._json(200, incident_view(c, row))
            elif path == "/api/loans":
                self._json(200, upsert_loan(c.store, body))
            elif path == "/api/handling":
                self._json(200, c.report_handling(str(body.get("agent", "")), str(body.get("device", "")),
                                                  str(body.get("note", "")), str(body.get("by", ""))))
            else:
                self._error(404, "not found")
        except KeyError:
            self._error(404, f"no incident {parts[3] if len(parts) > 3 else ''}")
        except (IncidentError, RegistryError, ValueError) as exc:
            self._error(400, str(exc))
        except Exception:
            log.exception("POST %s failed", self.path)
            self._error(500, "internal error")

    do_HEAD = do_GET


def _static(name: str) -> bytes:
    return resources.files("collector.web").joinpath("static", name).read_bytes()


class WebServer:
    def __init__(self, collector: Collector, host: str = "127.0.0.1", port: int = 8080) -> None:
        handler = type("BoundHandler", (Handler,), {"collector": collector})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pantau-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
