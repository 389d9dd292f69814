"""Notifications to the unit's PIC and to central IT: email (SMTP) and a JSON webhook.

One message per incident *state change* (status and effective cause), not per event: a
change waits ``delay_s`` to be confirmed; if the incident flaps back to the state last
announced within that time, nothing is sent. Failed deliveries are retried with back-off.
"""

from __future__ import annotations

import json
import logging
import smtplib
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from collector.registry import lookup
from collector.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

CAUSE_ID = {"device_fault": "kerusakan perangkat (tanggung jawab Pusdatin)",
            "handling_damage": "kerusakan karena penanganan (tanggung jawab unit)",
            "host_issue": "masalah PC ruangan/lingkungan", "needs_inspection": "perlu diperiksa"}
STATUS_ID = {"open": "TERBUKA", "resolved": "SELESAI", "withdrawn": "DIBATALKAN"}


@dataclass
class NotifyConfig:
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "pantau@localhost"
    central_it: list[str] = field(default_factory=list)
    webhook_url: str | None = None
    delay_s: float = 60.0
    dashboard_url: str = ""


@dataclass
class _Pending:
    state: tuple[str, str]
    due: float
    attempts: int = 0


class Notifier:
    def __init__(self, store: SqliteStore, cfg: NotifyConfig) -> None:
        self.store = store
        self.cfg = cfg
        self._pending: dict[str, _Pending] = {}
        self._announced: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="pantau-notify", daemon=True)

    @staticmethod
    def _state(row: dict[str, Any]) -> tuple[str, str]:
        return (row["status"], row.get("decided_cause") or row["cause"])

    def on_incident(self, action: str, row: dict[str, Any]) -> None:
        """IncidentBook listener: schedule (or cancel) one message for this incident."""
        iid, state = row["id"], self._state(row)
        with self._lock:
            announced = self._announced.get(iid)
            if state == announced or (announced is None and state[0] != "open"):
                # back to what was announced, or over before it was ever confirmed: nothing to say
                self._pending.pop(iid, None)
            else:
                self._pending[iid] = _Pending(state, time.monotonic() + self.cfg.delay_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.cfg.delay_s / 4))):
            self.deliver_due()

    def deliver_due(self) -> int:
        now = time.monotonic()
        with self._lock:
            due = [(iid, p) for iid, p in self._pending.items() if p.due <= now]
        n = 0
        for iid, p in due:
            rows = self.store.query("SELECT * FROM incidents WHERE id = ?", (iid,))
            if not rows:
                continue
            row = rows[0]
            if self._state(row) != p.state:
                continue  # superseded; the newer change has its own pending entry
            try:
                self._send(row)
            except Exception as exc:
                self.failures += 1
                p.attempts += 1
                p.due = now + min(600.0, 5.0 * 2 ** p.attempts)
                log.warning("notification for incident %s failed (attempt %d): %s", iid, p.attempts, exc)
                continue
            with self._lock:
                if self._pending.get(iid) is p:
                    del self._pending[iid]
                self._announced[iid] = p.state
            self.sent += 1
            n += 1
        return n

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
        payload = {"incident": {k: row[k] for k in ("id", "kind", "agent", "device", "status", "cause", "rule",
                                                    "responsible", "confidence", "opened_at", "resolved_at",
                                                    "summary", "decided_cause")},
                   "registry": reg}
        payload["incident"]["evidence"] = json.loads(row["evidence"])
        return subject, body, payload

    def _send(self, row: dict[str, Any]) -> None:
        subject, body, payload = self._message(row)
        to = list(self.cfg.central_it)
        pic = (payload["registry"].get("pic") or {}).get("email")
        if pic:
            to.append(pic)
        if self.cfg.smtp_host and to:
            msg = EmailMessage()
            msg["From"] = self.cfg.smtp_from
            msg["To"] = ", ".join(to)
            msg["Subject"] = subject
            msg.set_content(body)
            with smtplib.SMTP(self.cfg.smtp_host, self.cfg.smtp_port, timeout=10) as s:
                s.send_message(msg)
        if self.cfg.webhook_url:
            req = urllib.request.Request(self.cfg.webhook_url, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status >= 300:
                    raise RuntimeError(f"webhook answered {r.status}")
