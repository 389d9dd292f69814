"""Write captures the way an agent would, for scenario tests: explicit times, explicit seq."""

from __future__ import annotations

import io
import json
import os
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

T0 = datetime(2026, 11, 30, 1, 0, tzinfo=UTC)


def ts(minutes: float = 0, base: datetime = T0) -> str:
    t = base + timedelta(minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def device(key: str = "046d:085e:CAM1", kind: str = "camera", port: str = "2-1", **kw: Any) -> dict[str, Any]:
    vid, pid, *rest = key.replace("@", ":").split(":")
    serial = None if "@" in key else (rest[0] if rest else None)
    return {"key": key, "vid": vid, "pid": pid, "serial": serial, "kind": kind, "vendor": "V", "product": f"P-{kind}",
            "port": port, "speed": "high", "max_speed": "high", "firmware": "1.0", **kw}


CAM = device()
SPK = device("0b0e:2456:SPK1", "speakerphone", "2-2")


class Agent:
    """One agent boot: appends capture lines with strictly increasing seq."""

    def __init__(self, name: str = "room-1", boot: str = "boot0001aaaa", lines: list[str] | None = None,
                 prev_boot: str | None = None, base: datetime = T0) -> None:
        self.name, self.boot, self.seq, self.prev_boot, self.base = name, boot, 0, prev_boot, base
        self.lines: list[str] = [] if lines is None else lines

    def restart(self, boot: str, base: datetime | None = None) -> Agent:
        """The next boot of this agent (its agent.started names this one as prev_boot)."""
        return Agent(self.name, boot, self.lines, prev_boot=self.boot, base=base or self.base)

    def _msg(self, channel: str, kind: str, at: float, seq: int | None = None, **body: Any) -> dict[str, Any]:
        if seq is None:
            self.seq += 1
            seq = self.seq
        p = {"v": 1, "agent": self.name, "boot": self.boot, "seq": seq, "ts": ts(at, self.base), "kind": kind,
             **body}
        self.lines.append(json.dumps({"topic": f"pantau/v1/agents/{self.name}/{channel}", "payload": p}))
        return p

    def started(self, at: float = 0, devices: list[dict[str, Any]] | None = None) -> Agent:
        self._msg("events", "event", at, type="agent.started",
                  context={"host_boot": ts(at - 3, self.base), "prev_boot": self.prev_boot})
        self._msg("state", "state", at, state="online", version="1.0.0", platform="linux", hostname=self.name,
                  labels={"unit": "setjen", "room": "r1"}, interval_s=30)
        self.inventory(at, devices if devices is not None else [CAM, SPK])
        return self

    def inventory(self, at: float, devices: list[dict[str, Any]]) -> None:
        self._msg("inventory", "inventory", at, devices=devices)

    def event(self, etype: str, at: float, dev: dict[str, Any] | None = None, seq: int | None = None,
              **body: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {"type": etype, "context": body.pop("context", {})}
        if dev is not None:
            extra["device"] = dev
        extra.update(body)
        return self._msg("events", "event", at, seq=seq, **extra)

    def error(self, at: float, dev: dict[str, Any], code: str, seq: int | None = None) -> dict[str, Any]:
        return self.event("device.error", at, dev, seq=seq, error={
            "code": code, "source": "kernel", "errno": None, "problem_code": None, "message": code, "count": 1})

    def detach(self, at: float, dev: dict[str, Any], in_use: bool = False, seq: int | None = None) -> dict[str, Any]:
        return self.event("device.detached", at, dev, seq=seq,
                          context={"in_use": in_use, "users": ["zoom"] if in_use else [], "meeting": in_use})

    def attach(self, at: float, dev: dict[str, Any], seq: int | None = None) -> dict[str, Any]:
        return self.event("device.attached", at, dev, seq=seq, context={"in_use": False, "users": [],
                                                                       "meeting": False})

    def telemetry(self, at: float, present: list[str], seq: int | None = None) -> None:
        self._msg("telemetry", "telemetry", at, seq=seq, host={"cpu_pct": 1.0, "mem_pct": 2.0, "disk_pct": 3.0,
                                                      "uptime_s": 10, "temp_c": None},
                  devices=[{"key": k, "present": True, "in_use": False, "speed": "high", "errors_total": 0,
                            "resets_total": 0} for k in present])

    def will(self) -> dict[str, Any]:
        """The broker's copy of this boot's will: no ts, no seq."""
        p = {"v": 1, "agent": self.name, "boot": self.boot, "kind": "state", "state": "offline", "reason": "lost"}
        self.lines.append(json.dumps({"topic": f"pantau/v1/agents/{self.name}/state", "payload": p}))
        return p

    def dashboard_report(self, at: float, dev: dict[str, Any], boot: str = "dashboard-0123456789ab") -> dict[str, Any]:
        """A handling report made at the dashboard: its own boot, seq 1, dated on this agent's clock."""
        p = {"v": 1, "agent": self.name, "boot": boot, "seq": 1, "ts": ts(at, self.base), "kind": "event",
             "type": "handling.reported", "device": dev,
             "context": {"note": "jatuh", "reported_by": "budi", "via": "dashboard"}}
        self.lines.append(json.dumps({"topic": f"pantau/v1/agents/{self.name}/events", "payload": p}))
        return p

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# ---------------------------------------------------------------- running a capture both ways


def replay(text: str) -> list[dict[str, Any]]:
    """Incidents of a capture through ``pantau-collector replay``'s path."""
    from collector.replay import replay_stream

    return [inc.to_json() for inc in replay_stream(io.StringIO(text)).incidents]


def live(text: str, db: Path | str, tick: bool = True, restart: bool = False) -> list[dict[str, Any]]:
    """Incidents of a capture through the live ingest path into a real store, a SQLite file or a PostgreSQL
    database (optionally after a maintenance pass and a restart of the collector on it)."""
    from collector.capture import parse_line
    from collector.ingest import Collector, Inbound
    from collector.store import open_store

    if str(db).startswith("postgresql://"):  # a server's chain needs its key configured (no file beside it)
        import tempfile

        from collector import audit

        audit.configure(str(db), os.path.join(tempfile.gettempdir(), "pantau-test-audit.key"))
    store = open_store(str(db))
    c = Collector(store)
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = parse_line(line, n)
        except ValueError:
            continue
        if rec is None:
            continue
        payload = rec.payload if isinstance(rec.payload, bytes) else json.dumps(rec.payload).encode()
        c.ingest([Inbound(rec.topic, payload, time.time(), rec.received_at)])
    if tick:
        c.tick()
    if restart:
        store.close()
        store = open_store(str(db))
        Collector(store).tick()
    rows = store.query("SELECT * FROM incidents WHERE status != 'withdrawn' ORDER BY opened_at, agent")
    store.close()
    return rows


FIELDS = ("id", "kind", "device", "rule", "cause", "responsible", "opened_at", "resolved_at")

# A fresh PostgreSQL database for each live run of a scenario (``incidents``, ``stores``), when a test module
# asks for both stores (``PgDatabases``, set by an autouse fixture of the policy tests); None: SQLite only.
PG_DATABASE: Callable[[], str] | None = None


class PgDatabases:
    """An empty PostgreSQL database for each call, cheaply: one migrated database of ``server``, emptied before
    each use (every row of every table but the schema version deleted, identities started again at 1) on a
    connection kept for it. Some 10 ms a scenario, where TRUNCATE takes 60 ms, a new database 110 ms (migrated)
    and a copy of a migrated template 130 ms."""

    def __init__(self, server: Any) -> None:
        import psycopg

        from collector.store.postgres import PostgresStore

        self.dsn = str(server.new_database())
        PostgresStore(self.dsn).close()
        self.conn = psycopg.connect(self.dsn, autocommit=True)

    def __call__(self) -> str:
        tables = [r[0] for r in self.conn.execute("SELECT quote_ident(tablename) FROM pg_tables "
                                                  "WHERE schemaname = 'public' AND tablename != 'pantau_schema'")]
        self.conn.execute("; ".join([*(f"DELETE FROM {t}" for t in tables),
                                     "SELECT setval(format('%I.%I', schemaname, sequencename)::regclass, 1, false) "
                                     "FROM pg_sequences WHERE schemaname = 'public'"]))
        return self.dsn

    def close(self) -> None:
        self.conn.close()


@contextmanager
def on_postgres(server: Any) -> Iterator[None]:
    """Within it, every scenario's live run is repeated on a fresh PostgreSQL database of ``server``."""
    global PG_DATABASE
    PG_DATABASE = databases = PgDatabases(server)
    try:
        yield
    finally:
        PG_DATABASE = None
        databases.close()


def stores(tmp_path: Path, name: str = "live.sqlite") -> list[str]:
    """Where a scenario's live run goes: a SQLite file, and a fresh PostgreSQL database when the module
    runs on both stores (``PG_DATABASE``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return [str(tmp_path / name), *([PG_DATABASE()] if PG_DATABASE is not None else [])]


def incidents(text: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Replay and live agree on every incident's identity, rule and times (and its evidence), on every store."""
    rp = replay(text)
    for db in stores(tmp_path):
        lv = live(text, db)
        assert sorted(tuple(i[f] for f in FIELDS) for i in rp) == sorted(tuple(r[f] for f in FIELDS) for r in lv), db
        assert sorted(json.dumps(i["evidence"]) for i in rp) == sorted(
            json.dumps(json.loads(r["evidence"])) for r in lv), db
    return rp


def brief(incs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(i["device"], i["kind"], i["rule"]) for i in incs]


# ---------------------------------------------------------------- messages for ingest tests


DEV = {"key": "046d:0843:A1", "vid": "046d", "pid": "0843", "serial": "A1", "kind": "camera", "port": "1-2"}


def usage_event(seq: int, agent: str = "load-1", boot: str = "bootload0001") -> bytes:
    return json.dumps({"v": 1, "agent": agent, "boot": boot, "seq": seq, "kind": "event",
                       "ts": f"2026-11-30T03:{seq // 60000:02d}:{(seq // 1000) % 60:02d}.{seq % 1000:03d}Z",
                       "type": "device.usage", "device": DEV,
                       "context": {"in_use": seq % 2 == 0, "users": [], "meeting": False}}).encode()


_CHANNEL = {"event": "events", "telemetry": "telemetry", "inventory": "inventory", "state": "state"}
_POISON: list[tuple[str, bytes]] = [
    ("seq_2_63", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":9223372036854775808,'
                 b'"ts":"2026-11-30T01:00:00Z","kind":"event","type":"agent.stopping"}'),
    ("lone_surrogate", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":1,"ts":"2026-11-30T01:00:00Z",'
                       b'"kind":"event","type":"handling.reported","device":{"key":"a:b:c"},'
                       b'"context":{"note":"\\ud800"}}'),
    ("int_400_digits", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":2,"ts":"2026-11-30T01:00:00Z",'
                       b'"kind":"telemetry","host":{"uptime_s":' + b"9" * 400 + b'},"devices":[]}'),
    ("speed_list", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":3,"ts":"2026-11-30T01:00:00Z",'
                   b'"kind":"inventory","devices":[{"key":"a:b:c","speed":[]}]}'),
    ("year_one", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":4,"ts":"0001-01-01T00:00:00Z",'
                 b'"kind":"event","type":"agent.stopping"}'),
    ("infinity", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":5,"ts":"2026-11-30T01:00:00Z",'
                 b'"kind":"telemetry","host":{"cpu_pct":1e999},"devices":[]}'),
    ("duplicate_key", b'{"v":1,"agent":"evil","boot":"bootevil0001","seq":6,"seq":7,'
                      b'"ts":"2026-11-30T01:00:00Z","kind":"event","type":"agent.stopping"}'),
]


def poison_messages() -> list[tuple[str, bytes]]:
    """(topic, payload) of messages that once broke ingest: validation must dead-letter each."""
    out = []
    for _, raw in _POISON:
        kind = json.loads(raw.replace(b"\\ud800", b"").replace(b"1e999", b"1"))["kind"]
        out.append((f"pantau/v1/agents/evil/{_CHANNEL[kind]}", raw))
    return out


# ---------------------------------------------------------------- the simulated bus (docs/simulated-bus.md)

CAMERA = {"vid": "046d", "pid": "0843", "serial": "A1B2C3D4", "kind": "camera", "vendor": "Logitech",
          "product": "Logitech Webcam C930e", "port": "1-2", "speed": "high", "max_speed": "high",
          "firmware": "0.13", "in_use": False, "users": [], "meeting": False}
SPEAKER = {"vid": "0b0e", "pid": "2456", "serial": None, "kind": "speakerphone", "vendor": "Jabra",
           "product": "Jabra SPEAK 810", "port": "1-3.1", "speed": "full", "max_speed": "full",
           "in_use": False, "users": [], "meeting": False}


def write_bus(path: Path, *devices: dict[str, Any]) -> None:
    """Write a simulated bus file the way the demo's room is edited: atomically, visibly changed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": list(devices)}))
    os.replace(tmp, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a visible change even within one tick


# ---------------------------------------------------------------- a registry and a collector fed by an Agent

REGISTRY = """
[[units]]
id = "setjen"
name = "Sekretariat Jenderal"
pic = { name = "Budi", email = "budi@setjen.example", phone = "0812" }
rooms = [{ id = "r1", name = "Ruang Sidang", agent = "room-1" }]

[[units.devices]]
key = "046d:085e:CAM1"
room = "r1"
lease_end = "2027-01-04"
condition = "baru"
"""


def feed(c: Any, a: Agent, start: int = 0) -> int:
    """Ingest an agent's capture lines from ``start`` into a live Collector, then a maintenance pass."""
    from collector.ingest import Inbound

    for line in a.lines[start:]:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    c.tick()
    return len(a.lines)


# ---------------------------------------------------------------- webhook receivers for notification tests

class Hooks:
    """Webhook servers: ``ok`` answers 204; ``trickle`` sends its answer one byte every 5 s;
    ``silent`` reads the request and never answers."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.connections = {"trickle": 0, "silent": 0}
        self.stop = threading.Event()
        self.servers: list[socketserver.BaseServer] = []

    def start(self, kind: str) -> str:
        hooks = self

        class Ok(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hooks.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        class Slow(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                hooks.connections[kind] += 1
                self.request.recv(65536)
                answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
                for i in range(len(answer)):
                    if kind == "trickle":
                        try:
                            self.request.send(answer[i:i + 1])
                        except OSError:
                            return
                    if hooks.stop.wait(5.0):
                        return

        srv: socketserver.BaseServer
        if kind == "ok":
            srv = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
        else:
            srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Slow)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/hook"

    def close(self) -> None:
        self.stop.set()
        for s in self.servers:
            s.shutdown()
            s.server_close()


# ---------------------------------------------------------------- a broker's certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def broker_pki(d: Path) -> None:
    """A test CA (``ca.crt``) and a certificate for a broker on localhost / 127.0.0.1 (``broker.crt``,
    ``broker.key``) in a new folder ``d``, readable by the broker's user."""
    d.mkdir()
    os.chmod(d, 0o755)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=pantau-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    for f in d.iterdir():
        os.chmod(f, 0o644)
