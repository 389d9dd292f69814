"""Notifications to the unit's PIC and to central IT: email (SMTP) and a JSON webhook.

One message per incident *state change* (status and effective cause), not per event: a change
waits ``delay_s`` to be confirmed; if the incident flaps back to the state last announced within
that time, nothing is sent.

The incident book's listener only enqueues, so a stuck mail server or webhook never delays ingest
or classification. A confirmed change becomes one delivery per channel, recorded in the store
(table ``notify_delivery``, created here): each channel has its own thread, its own retries with
back-off, and a delivery that went is never sent again (a webhook that never answers does not
make the e-mail go twice). Every attempt has a connect timeout and a total deadline: a peer that
answers one byte at a time is cut off when the deadline passes. Header values are made safe (a
CR/LF in a device key or a registry name cannot break or add mail headers).

Other watchers announce through the same channels and record (``add_source``, ``record``,
``announced``): their deliveries carry ``<source>:<key>`` where an incident's carry its id, and the
source renders the message (``collector/fleet_notify.py``: room PCs offline too long, clocks off).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.client import HTTPConnection, HTTPSConnection
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from collector.registry import lookup
from collector.store import Store
from common.protocol import format_epoch

log = logging.getLogger(__name__)

CAUSE_ID = {"device_fault": "kerusakan perangkat (tanggung jawab Pusdatin)",
            "handling_damage": "kerusakan karena penanganan (tanggung jawab unit)",
            "host_issue": "masalah PC ruangan/lingkungan", "needs_inspection": "perlu diperiksa"}
STATUS_ID = {"open": "TERBUKA", "resolved": "SELESAI", "withdrawn": "DIBATALKAN"}

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS notify_delivery (
        id INTEGER PRIMARY KEY,
        incident TEXT NOT NULL,
        status TEXT NOT NULL,
        cause TEXT NOT NULL,
        channel TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        created_at REAL NOT NULL,
        next_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        sent_at TEXT,
        last_error TEXT)""",
    "CREATE INDEX IF NOT EXISTS notify_delivery_due ON notify_delivery (channel, state, next_at)",
    "CREATE INDEX IF NOT EXISTS notify_delivery_incident ON notify_delivery (incident, id)",
)
# state: pending -> sent | skipped (nobody to send to) | superseded (a newer change came first) | gave_up

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_ADDRESS = re.compile(r"^[^@\s<>,;:\"()\[\]\\]+@[^@\s<>,;:\"()\[\]\\]+$")


def header_safe(value: str, limit: int = 900) -> str:
    """One line: control characters (CR, LF, tab, ...) become a space; long values are cut."""
    text = _UNSAFE.sub(" ", value).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def address_ok(addr: str) -> bool:
    return bool(_ADDRESS.match(addr))


@dataclass
class NotifyConfig:
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "pantau@localhost"
    central_it: list[str] = field(default_factory=list)
    webhook_url: str | None = None
    delay_s: float = 60.0
    dashboard_url: str = ""
    connect_timeout_s: float = 10.0
    total_timeout_s: float = 30.0  # one attempt, from connect to the last byte of the answer
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    give_up_s: float = 86400.0  # a delivery still failing after this long is abandoned (and logged)

    @property
    def channels(self) -> list[str]:
        return [c for c, on in (("email", bool(self.smtp_host)), ("webhook", bool(self.webhook_url))) if on]


@dataclass
class Message:
    """What one delivery says: mail subject and body, the webhook's JSON, and the unit PIC's address."""

    subject: str
    body: str
    payload: dict[str, Any]
    pic_email: str | None = None


Render = Callable[[dict[str, Any]], Message | None]  # a notify_delivery row -> its message; None: gone


@dataclass
class _Pending:
    state: tuple[str, str]
    due: float


class Deadline:
    """A total time limit for one delivery: when it passes, the watched sockets are shut down, so a
    peer trickling bytes (each read within the per-read timeout) cannot hold the channel."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.end = time.monotonic() + total_s
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(total_s, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self.total_s:g} s")
        return left

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shut(sock)
        return sock

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                self._shut(s)

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._timer.cancel()
        if ev is not None and self.expired and not isinstance(ev, TimeoutError):
            raise TimeoutError(f"no complete answer within {self.total_s:g} s ({type(ev).__name__})") from ev


class _SMTP(smtplib.SMTP):
    def __init__(self, deadline: Deadline, connect_timeout: float) -> None:
        self._deadline, self._connect_timeout = deadline, connect_timeout
        super().__init__(local_hostname=header_safe(socket.gethostname()) or "localhost", timeout=connect_timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), min(self._connect_timeout, self._deadline.remaining()),
                                        self.source_address)
        sock.settimeout(min(timeout, self._deadline.remaining()))
        return self._deadline.watch(sock)


def send_mail(cfg: NotifyConfig, msg: EmailMessage, to: list[str]) -> None:
    assert cfg.smtp_host
    with Deadline(cfg.total_timeout_s) as dl:
        s = _SMTP(dl, cfg.connect_timeout_s)
        try:
            s.connect(cfg.smtp_host, cfg.smtp_port)
            s.send_message(msg, from_addr=header_safe(cfg.smtp_from), to_addrs=to)
            s.quit()
        finally:
            s.close()


def post_json(cfg: NotifyConfig, url: str, body: bytes) -> int:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"webhook_url {url!r} is not an http(s) URL")
    with Deadline(cfg.total_timeout_s) as dl:
        cls = HTTPSConnection if u.scheme == "https" else HTTPConnection
        conn = cls(u.hostname, u.port, timeout=min(cfg.connect_timeout_s, dl.remaining()))
        make: Callable[..., socket.socket] = socket.create_connection

        def connect(*args: Any, **kw: Any) -> socket.socket:
            sock = dl.watch(make(*args, **kw))
            sock.settimeout(min(cfg.connect_timeout_s, dl.remaining()))
            return sock

        conn._create_connection = connect  # type: ignore[attr-defined]  # watched before any TLS handshake
        try:
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                           "User-Agent": "pantau-collector"})
            resp = conn.getresponse()
            resp.read(65536)
            status = int(resp.status)
        finally:
            conn.close()
    if status >= 300:
        raise RuntimeError(f"webhook answered {status}")
    return status


class Notifier:
    def __init__(self, store: Store, cfg: NotifyConfig) -> None:
        self.store = store
        self.cfg = cfg
        # with several collectors on one database, only the classifying one delivers (each delivery once)
        self.may_deliver: Callable[[], bool] = lambda: True
        self._inbox: queue.SimpleQueue[tuple[str, tuple[str, str], float]] = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._stop = threading.Event()
        self._wake = {ch: threading.Event() for ch in cfg.channels}
        self._channel_lock = {ch: threading.Lock() for ch in cfg.channels}
        self._schedule_lock = threading.Lock()
        self.sent = 0
        self.failures = 0
        self._sources: dict[str, Render] = {}
        for sql in SCHEMA:
            with store.tx() as db:
                db.execute(sql)
        with store.tx() as db:  # added for other sources: what they said, as of the change (JSON)
            if "detail" not in {r[1] for r in db.execute("PRAGMA table_info(notify_delivery)")}:
                db.execute("ALTER TABLE notify_delivery ADD COLUMN detail TEXT")
        self._announced: dict[str, tuple[str, str]] = {
            r["incident"]: (r["status"], r["cause"]) for r in store.query(
                "SELECT incident, status, cause FROM notify_delivery WHERE id IN "
                "(SELECT max(id) FROM notify_delivery GROUP BY incident)")}
        self._threads = [threading.Thread(target=self._run, name="pantau-notify", daemon=True)]
        self._threads += [threading.Thread(target=self._run_channel, args=(ch,), name=f"pantau-notify-{ch}",
                                           daemon=True) for ch in cfg.channels]

    @staticmethod
    def _state(row: dict[str, Any]) -> tuple[str, str]:
        return (row["status"], row.get("decided_cause") or row["cause"])

    def on_incident(self, action: str, row: dict[str, Any]) -> None:
        """IncidentBook listener: enqueue only (never blocks, never touches the network or the store)."""
        self._inbox.put((row["id"], self._state(row), time.monotonic()))

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for ev in self._wake.values():
            ev.set()
        for t in self._threads:
            if t.is_alive():
                t.join(2)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.cfg.delay_s / 4))):
            try:
                if self._schedule():
                    for ev in self._wake.values():
                        ev.set()
            except Exception:
                log.exception("scheduling notifications failed")

    def _run_channel(self, channel: str) -> None:
        while not self._stop.is_set():
            self._wake[channel].wait(1.0)
            self._wake[channel].clear()
            if self._stop.is_set():
                break
            try:
                self._deliver(channel)
            except Exception:
                log.exception("%s notifications failed", channel)

    def deliver_due(self) -> int:
        """Confirm due changes and deliver what is due on every channel, here and now; returns deliveries."""
        self._schedule()
        return sum(self._deliver(ch) for ch in self.cfg.channels)

    # ------------------------------------------------------------------ other sources
    def add_source(self, name: str, render: Render) -> None:
        """Deliveries recorded as ``<name>:<key>`` are rendered by ``render`` (None: the subject is gone)."""
        if not name or ":" in name:
            raise ValueError(f"notification source {name!r}: a non-empty name without ':'")
        self._sources[name] = render

    def announced(self, name: str) -> dict[str, tuple[str, str]]:
        """The last (status, cause) recorded for each key of source ``name``, from the store."""
        rows = self.store.query(
            "SELECT incident, status, cause FROM notify_delivery WHERE id IN (SELECT max(id) FROM notify_delivery "
            "WHERE incident >= ? AND incident < ? GROUP BY incident)", (f"{name}:", f"{name};"))
        return {r["incident"][len(name) + 1:]: (r["status"], r["cause"]) for r in rows}

    def record(self, name: str, key: str, status: str, cause: str, detail: dict[str, Any] | None = None) -> None:
        """Announce ``status``/``cause`` of ``<name>:<key>`` once on every channel, with ``detail`` (the
        facts as of the change, kept as JSON for the renderer); a delivery of an earlier state not
        made yet is superseded. Then wake the channels."""
        if name not in self._sources:
            raise ValueError(f"notification source {name!r} is not registered")
        ref, wall = f"{name}:{key}", time.time()
        text = None if detail is None else json.dumps(detail, sort_keys=True)
        with self.store.tx() as db:
            db.execute("UPDATE notify_delivery SET state = 'superseded' WHERE incident = ? AND state = 'pending'",
                       (ref,))
            for ch in self.cfg.channels:
                db.execute("INSERT INTO notify_delivery (incident, status, cause, channel, created_at, next_at, "
                           "detail) VALUES (?, ?, ?, ?, ?, ?, ?)", (ref, status, cause, ch, wall, wall, text))
        for ev in self._wake.values():
            ev.set()

    def _source(self, ref: str) -> Render | None:
        name, sep, _ = ref.partition(":")
        return self._sources.get(name) if sep else None

    # ------------------------------------------------------------------ confirming changes
    def _schedule(self) -> int:
        """Turn confirmed changes into recorded deliveries, one per channel; returns how many changes."""
        with self._schedule_lock:
            while True:
                try:
                    iid, state, at = self._inbox.get_nowait()
                except queue.Empty:
                    break
                announced = self._announced.get(iid)
                if state == announced or (announced is None and state[0] != "open"):
                    # back to what was announced, or over before it was ever confirmed: nothing to say
                    self._pending.pop(iid, None)
                else:
                    self._pending[iid] = _Pending(state, at + self.cfg.delay_s)
            now = time.monotonic()
            made = 0
            for iid, p in [(i, p) for i, p in self._pending.items() if p.due <= now]:
                del self._pending[iid]
                rows = self.store.query("SELECT status, cause, decided_cause FROM incidents WHERE id = ?", (iid,))
                if not rows or self._state(rows[0]) != p.state:
                    continue  # superseded; the newer change has its own entry
                wall = time.time()
                with self.store.tx() as db:
                    db.execute("UPDATE notify_delivery SET state = 'superseded' "
                               "WHERE incident = ? AND state = 'pending'", (iid,))
                    for ch in self.cfg.channels:
                        db.execute("INSERT INTO notify_delivery (incident, status, cause, channel, created_at, "
                                   "next_at) VALUES (?, ?, ?, ?, ?, ?)", (iid, *p.state, ch, wall, wall))
                self._announced[iid] = p.state
                made += 1
            return made

    # ------------------------------------------------------------------ delivering
    def _deliver(self, channel: str) -> int:
        n = 0
        if not self.may_deliver():
            return 0
        with self._channel_lock[channel]:
            due = self.store.query("SELECT * FROM notify_delivery WHERE channel = ? AND state = 'pending' "
                                   "AND next_at <= ? ORDER BY id", (channel, time.time()))
            for d in due:
                if self._stop.is_set():
                    break
                n += self._attempt(channel, d)
        return n

    def _render(self, d: dict[str, Any]) -> Message | None:
        render = self._source(d["incident"])
        if render is not None:
            return render(d)
        rows = self.store.query("SELECT * FROM incidents WHERE id = ?", (d["incident"],))
        return self._incident_message(dict(rows[0], status=d["status"])) if rows else None

    def _attempt(self, channel: str, d: dict[str, Any]) -> int:
        try:
            msg = self._render(d)
            if msg is None:
                self._finish(d, "skipped", "the incident is gone" if self._source(d["incident"]) is None
                             else "its subject is gone")
                return 0
            if channel == "email":
                done = self._send_email(msg, d["incident"])
            else:
                assert self.cfg.webhook_url
                post_json(self.cfg, self.cfg.webhook_url, json.dumps(msg.payload).encode())
                done = True
        except Exception as exc:
            self.failures += 1
            attempts = d["attempts"] + 1
            error = f"{type(exc).__name__}: {exc}"
            now = time.time()
            if now - d["created_at"] > self.cfg.give_up_s:
                log.error("giving up the %s notification for %s after %d attempts: %s",
                          channel, d["incident"], attempts, error)
                self._finish(d, "gave_up", error, attempts)
                return 0
            wait = min(self.cfg.retry_max_s, self.cfg.retry_base_s * 2 ** (attempts - 1))
            with self.store.tx() as db:
                db.execute("UPDATE notify_delivery SET attempts = ?, last_error = ?, next_at = ? WHERE id = ?",
                           (attempts, error[:500], now + wait, d["id"]))
            log.warning("%s notification for %s failed (attempt %d, next in %.0f s): %s",
                        channel, d["incident"], attempts, wait, error)
            return 0
        if not done:
            self._finish(d, "skipped", "no valid recipient")
            return 0
        self._finish(d, "sent", None, d["attempts"] + 1)
        self.sent += 1
        return 1

    def _finish(self, d: dict[str, Any], state: str, error: str | None, attempts: int | None = None) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE notify_delivery SET state = ?, last_error = ?, attempts = ?, sent_at = ? WHERE id = ?",
                       (state, error, d["attempts"] if attempts is None else attempts,
                        format_epoch(time.time()) if state == "sent" else None, d["id"]))

    def _incident_message(self, row: dict[str, Any]) -> Message:
        subject, body, payload = self._message(row)
        return Message(subject, body, payload, (payload["registry"].get("pic") or {}).get("email"))

    def _send_email(self, m: Message, ref: str) -> bool:
        wanted = list(self.cfg.central_it)
        if m.pic_email:
            wanted.append(m.pic_email)
        to = []
        for addr in wanted:
            if isinstance(addr, str) and address_ok(addr.strip()):
                to.append(addr.strip())
            else:
                log.warning("not mailing %r (%s): not a plain e-mail address", addr, ref)
        if not to:
            return False
        msg = EmailMessage()
        msg["From"] = header_safe(self.cfg.smtp_from)
        msg["To"] = ", ".join(to)
        msg["Subject"] = header_safe(m.subject)
        msg.set_content(m.body)
        send_mail(self.cfg, msg, to)
        return True

    def _message(self, row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        reg = lookup(self.store, row["device"], row["agent"])
        cause = row.get("decided_cause") or row["cause"]
        subject = (f"[Pantau] {STATUS_ID.get(row['status'], row['status'])}: {row['kind']} {row['device']} "
                   f"— {reg['unit_name'] or 'unit tidak terdaftar'}")
        body = "\n".join([
            row["summary"], "",
            f"Status: {row['status']}",
            f"Penyebab: {CAUSE_ID.get(cause, cause)} (aturan {row['rule']}, keyakinan {row['confidence']})",
            f"Unit: {reg['unit_name'] or '-'}  Ruang: {reg['room_name'] or reg['room'] or '-'}",
            f"PC ruangan: {row['agent']}  Dibuka: {row['opened_at']}  Selesai: {row['resolved_at'] or '-'}",
            f"Rincian: {self.cfg.dashboard_url}#incident={row['id']}" if self.cfg.dashboard_url else "",
        ])
        payload = {"incident": {k: row.get(k) for k in ("id", "kind", "agent", "device", "status", "cause", "rule",
                                                        "responsible", "confidence", "opened_at", "resolved_at",
                                                        "summary", "decided_cause")},
                   "registry": reg}
        payload["incident"]["evidence"] = json.loads(row["evidence"]) if row.get("evidence") else []
        return subject, body, payload

    def stats(self) -> dict[str, int]:
        """Deliveries by channel and state, for export."""
        out: dict[str, int] = {}
        for r in self.store.query("SELECT channel, state, count(*) AS n FROM notify_delivery GROUP BY channel, state"):
            out[f"{r['channel']}_{r['state']}"] = int(r["n"])
        return out
