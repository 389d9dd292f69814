"""Enrollment: one single-use, expiring token per room PC, redeemed for that PC's agent configuration.

An operator creates a token for a registered room (``pantau-collector enroll --unit U --room R``, or
``POST /api/enroll/tokens``); only its SHA-256 is stored. The room PC redeems it over HTTPS, pinned to
the collector's certificate fingerprint (``pantau-agent enroll``): it receives its agent id, labels,
the broker URL and CA, and a broker account made for it alone (``collector/dynsec.py``). A token
works once, until it expires; every attempt, refused or not, is written to the audit chain.
``disable_agent`` ends an agent's broker account (decommissioned, lease ended, PC replaced);
``enable_agent`` gives it back (a new loan of its room: ``collector/leases.py``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from collector import audit
from collector.dynsec import DynsecAdmin, DynsecError
from collector.store import Store
from common.config import parse_broker
from common.protocol import now_ts, valid_agent_id

TOKEN_PREFIX = "pe_"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 3600.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_EXPIRY_S = 90 * 86400.0


class EnrollError(ValueError):
    """A refused request: one line for the person at the room PC or the operator."""


class BrokerError(EnrollError):
    """The broker could not be reached, or its dynamic security plugin refused (one line)."""


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_duration(text: str) -> float:
    """``24h``, ``90m``, ``2d``, ``3600s`` (a bare number is hours) -> seconds."""
    m = _DURATION.match(text or "")
    if not m:
        raise EnrollError(f"expiry {text!r}: give a duration like 24h, 90m or 2d")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not 60 <= seconds <= MAX_EXPIRY_S:
        raise EnrollError(f"expiry {text!r}: must be between 1 minute and 90 days")
    return seconds


# ---------------------------------------------------------------- certificate fingerprints


def format_fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def cert_fingerprint(pem_path: str) -> str:
    """SHA-256 of the first certificate in a PEM file, as AB:CD:..."""
    try:
        with open(pem_path, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise EnrollError(f"cannot read the certificate {pem_path}: {exc.strerror}") from None
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    if not m:
        raise EnrollError(f"{pem_path} holds no PEM certificate")
    return format_fingerprint(ssl.PEM_cert_to_DER_cert(m.group(0)))


def url_fingerprint(url: str, timeout_s: float = 10.0) -> str:
    """The fingerprint of the certificate an HTTPS address presents now (e.g. a reverse proxy's)."""
    u = urlsplit(url)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only read; the fingerprint is what the operator then passes on
    try:
        with socket.create_connection((u.hostname or "", u.port or 443), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=u.hostname) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot read the certificate of {url}: {exc}") from None
    if not der:
        raise EnrollError(f"{url} presented no certificate")
    return format_fingerprint(der)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class EnrollSettings:
    public_url: str | None = None  # https://host:port as room PCs reach the collector
    cert_file: str | None = None  # the collector's own TLS certificate, if it serves HTTPS itself
    dynsec: DynsecAdmin | None = None
    agent_broker: str = "mqtt://127.0.0.1:1883"
    agent_ca_file: str | None = None
    prefix: str = "pantau"
    expires_s: float = 24 * 3600.0
    bundle_dir: str = "var/bundle"

    @classmethod
    def from_config(cls, cfg: Any) -> EnrollSettings:
        admin = None
        if cfg.dynsec_username:
            admin = DynsecAdmin(parse_broker(cfg.dynsec_broker or cfg.broker, "dynsec_broker"), cfg.dynsec_username,
                                cfg.dynsec_password or "", cfg.ca_file)
        public = cfg.public_url
        if public is None and cfg.tls_cert_file:
            host, port = cfg.http_host_port
            public = f"https://{socket.getfqdn() if host in ('0.0.0.0', '::') else host}:{port}"
        return cls(public_url=public.rstrip("/") if public else None, cert_file=cfg.tls_cert_file, dynsec=admin,
                   agent_broker=cfg.agent_broker or cfg.broker, agent_ca_file=cfg.agent_ca_file or cfg.ca_file,
                   prefix=cfg.prefix, expires_s=float(cfg.enroll_expires_h) * 3600, bundle_dir=cfg.bundle_dir)

    def fingerprint(self) -> str | None:
        if self.cert_file:
            return cert_fingerprint(self.cert_file)
        if self.public_url:
            return url_fingerprint(self.public_url)
        return None


_current: EnrollSettings | None = None


def configure(settings: EnrollSettings | None) -> None:
    """What the web side's enrollment routes use (set by the service from its configuration)."""
    global _current
    _current = settings


def current() -> EnrollSettings | None:
    return _current


# ---------------------------------------------------------------- tokens


def default_agent_id(store: Any, unit: str, room: str) -> str:
    """The room PC registered for the room, else ``<unit>-<room>`` cleaned to the agent id alphabet."""
    rows = store.query("SELECT agent FROM rooms WHERE id = ? AND agent IS NOT NULL", (room,))
    if rows and valid_agent_id(rows[0]["agent"]):
        return str(rows[0]["agent"])
    raw = f"{unit}-{room}".lower()
    return re.sub(r"[^a-z0-9._-]", "-", raw)[:64].strip("-") or "agent"


def new_token(store: Store, unit: str, room: str, expires_s: float, by: str,
              agent_id: str | None = None) -> dict[str, Any]:
    """A single-use token for ``room`` of ``unit``; the token itself is in the answer only."""
    if not 60 <= expires_s <= MAX_EXPIRY_S:
        raise EnrollError("a token expires between 1 minute and 90 days after it is made")
    found = store.query("SELECT unit FROM rooms WHERE id = ?", (room,))
    if not store.query("SELECT 1 FROM units WHERE id = ?", (unit,)):
        raise EnrollError(f"unit {unit!r} is not in the registry")
    if not found:
        raise EnrollError(f"room {room!r} is not in the registry")
    if found[0]["unit"] != unit:
        raise EnrollError(f"room {room!r} belongs to unit {found[0]['unit']!r}, not {unit!r}")
    agent = agent_id or default_agent_id(store, unit, room)
    if not valid_agent_id(agent):
        raise EnrollError(f"agent id {agent!r}: 1-64 characters of a-z 0-9 - _ .")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    at = now_ts()
    with store.tx() as db:
        db.execute("DELETE FROM enroll_tokens WHERE expires_at < ?", (now - 30 * 86400,))
        db.execute("INSERT INTO enroll_tokens (id, unit, room, agent, created_by, created_at, expires_at) "
                   "VALUES (?,?,?,?,?,?,?)", (_sha(token), unit, room, agent, by, now, now + expires_s))
        audit.append(db, at, by, None, "enroll.token_created",
                     {"unit": unit, "room": room, "agent": agent, "expires_at": _iso(now + expires_s)})
    return {"token": token, "unit": unit, "room": room, "agent_id": agent, "expires_at": _iso(now + expires_s)}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _refuse(store: Store, remote: str, why: str, detail: dict[str, Any]) -> EnrollError:
    with store.tx() as db:
        audit.append(db, now_ts(), f"enroll:{remote}", None, "enroll.refused", {"reason": why, **detail})
    return EnrollError(why)


def redeem(store: Store, settings: EnrollSettings, token: str, remote: str) -> dict[str, Any]:
    """Spend ``token``: the agent's configuration and its new broker account. Refusals raise
    ``EnrollError`` with one line; every attempt is audited as ``enroll:<remote address>``."""
    token = (token or "").strip()
    now = time.time()
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise _refuse(store, remote, "unknown enrollment token", {})
    with store.tx() as db:
        row = db.execute("SELECT unit, room, agent, expires_at, used_at FROM enroll_tokens WHERE id = ?",
                         (_sha(token),)).fetchone()
        claimed = row is not None and row[4] is None and row[3] > now and db.execute(
            "UPDATE enroll_tokens SET used_at = ?, used_from = ? WHERE id = ? AND used_at IS NULL",
            (now, remote[:64], _sha(token))).rowcount == 1
    if row is None:
        raise _refuse(store, remote, "unknown enrollment token", {})
    unit, room, agent = row[0], row[1], row[2]
    if row[4] is not None or (not claimed and row[3] > now):
        raise _refuse(store, remote, f"this enrollment token was used already ({_iso(row[4] or now)}); "
                      "ask for a new one", {"agent": agent})
    if not claimed:
        raise _refuse(store, remote, f"this enrollment token expired at {_iso(row[3])}; ask for a new one",
                      {"agent": agent})
    password = secrets.token_urlsafe(24)
    try:
        if settings.dynsec is None:
            raise DynsecError("this collector manages no broker accounts (dynsec_username is not set)")
        settings.dynsec.ensure_agent(agent, password, settings.prefix)
    except DynsecError as exc:
        with store.tx() as db:  # the token stays good: the operator fixes the broker, the PC tries again
            db.execute("UPDATE enroll_tokens SET used_at = NULL, used_from = NULL WHERE id = ?", (_sha(token),))
        raise _refuse(store, remote, f"the collector could not create the broker account: {exc}",
                      {"agent": agent}) from None
    ca = None
    if settings.agent_ca_file:
        with open(settings.agent_ca_file, encoding="ascii", errors="replace") as fh:
            ca = fh.read()
    at = now_ts()
    with store.tx() as db:
        db.execute("INSERT INTO agent_accounts (agent, unit, room, enrolled_at, enrolled_from) VALUES (?,?,?,?,?) "
                   "ON CONFLICT(agent) DO UPDATE SET unit=excluded.unit, room=excluded.room, "
                   "enrolled_at=excluded.enrolled_at, enrolled_from=excluded.enrolled_from, disabled_at=NULL, "
                   "disabled_by=NULL, disabled_reason=NULL", (agent, unit, room, at, remote[:64]))
        audit.append(db, at, f"enroll:{remote}", None, "agent.enrolled", {"agent": agent, "unit": unit, "room": room})
    return {"agent_id": agent, "labels": {"unit": unit, "room": room}, "broker": settings.agent_broker,
            "username": agent, "password": password, "ca": ca, "prefix": settings.prefix}


def disable_agent(store: Store, settings: EnrollSettings | None, agent: str, by: str,
                  reason: str = "", detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """Disable an agent's broker account now (the broker drops its connection); audited (with
    ``detail`` added to the audit entry)."""
    if not valid_agent_id(agent):
        raise EnrollError(f"agent id {agent!r}: 1-64 characters of a-z 0-9 - _ .")
    if settings is None or settings.dynsec is None:
        raise EnrollError("this collector manages no broker accounts (dynsec_username is not set)")
    try:
        on_broker = settings.dynsec.disable_agent(agent)
    except DynsecError as exc:
        raise BrokerError(str(exc)) from None
    known = bool(store.query("SELECT 1 FROM agent_accounts WHERE agent = ?", (agent,)))
    if not on_broker and not known:
        raise EnrollError(f"no agent {agent!r}: it was never enrolled and has no broker account")
    at = now_ts()
    with store.tx() as db:
        db.execute("UPDATE agent_accounts SET disabled_at = ?, disabled_by = ?, disabled_reason = ? WHERE agent = ?",
                   (at, by, reason[:500], agent))
        audit.append(db, at, by, None, "agent.disabled", {**(detail or {}), "agent": agent, "reason": reason[:500],
                                                          "broker_account": on_broker})
    return {"agent": agent, "disabled_at": at, "broker_account": on_broker}


def enable_agent(store: Store, settings: EnrollSettings | None, agent: str, by: str, reason: str = "",
                 detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """Enable a disabled agent's broker account again, its password unchanged (the room PC's agent,
    still configured, connects again); audited. A new enrollment does this with a new password."""
    if not valid_agent_id(agent):
        raise EnrollError(f"agent id {agent!r}: 1-64 characters of a-z 0-9 - _ .")
    if settings is None or settings.dynsec is None:
        raise EnrollError("this collector manages no broker accounts (dynsec_username is not set)")
    if not store.query("SELECT 1 FROM agent_accounts WHERE agent = ?", (agent,)):
        raise EnrollError(f"no agent {agent!r}: it was never enrolled")
    try:
        on_broker = settings.dynsec.enable_agent(agent)
    except DynsecError as exc:
        raise BrokerError(str(exc)) from None
    if not on_broker:
        raise EnrollError(f"the broker has no account {agent!r} any more: enroll the room PC again")
    at = now_ts()
    with store.tx() as db:
        db.execute("UPDATE agent_accounts SET disabled_at = NULL, disabled_by = NULL, disabled_reason = NULL "
                   "WHERE agent = ?", (agent,))
        audit.append(db, at, by, None, "agent.enabled", {**(detail or {}), "agent": agent, "reason": reason[:500]})
    return {"agent": agent, "enabled_at": at}


def accounts(store: Any) -> list[dict[str, Any]]:
    return list(store.query("SELECT * FROM agent_accounts ORDER BY agent"))
