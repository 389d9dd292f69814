"""Accounts, roles, sessions and tokens.

Roles: ``admin`` (accounts and the registry, and everything an operator may do), ``operator``
(central IT: override, acknowledge, loans, handling reports), ``pic`` (one unit: sees only that
unit, reports handling and comments on its incidents), ``viewer`` (reads everything, changes nothing).

Passwords are hashed with argon2id. Session ids, API tokens and one-time sign-in tokens are random
and only their SHA-256 is stored, so a copy of the database does not let anyone sign in.
Changes to accounts are written to the audit chain.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from collector import audit
from collector.registry import Queryable
from collector.store import Store
from common.protocol import now_ts

ROLES = ("admin", "operator", "pic", "viewer")
PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"read", "audit", "users", "registry", "loans", "override", "acknowledge", "handling",
                        "comment"}),
    "operator": frozenset({"read", "audit", "loans", "override", "acknowledge", "handling", "comment"}),
    "pic": frozenset({"read", "handling", "comment"}),
    "viewer": frozenset({"read", "audit"}),
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
FAIL_WINDOW_S = 15 * 60
MAX_FAILS_PER_USER = 5
MAX_FAILS_PER_ADDRESS = 20
ONCE_TTL_S = 24 * 3600

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class UserError(ValueError):
    pass


@dataclass(frozen=True)
class User:
    name: str
    role: str
    unit: str | None

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())

    @property
    def scoped(self) -> bool:
        """True when this user sees only one unit."""
        return self.role == "pic"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "unit": self.unit,
                "permissions": sorted(PERMISSIONS.get(self.role, frozenset()))}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _row_user(r: dict[str, Any]) -> User:
    return User(r["name"], r["role"], r["unit"])


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise UserError("a password cannot hold control characters")
    if len(set(password) - {" "}) < 3:
        raise UserError("a password needs at least three different characters besides spaces")


def add(store: Store, name: str, role: str, unit: str | None, password: str | None, by: str) -> User:
    if not NAME_RE.match(name or ""):
        raise UserError(f"user name {name!r}: 1-64 of letters, digits and . _ @ -, starting with a letter or digit")
    if role not in ROLES:
        raise UserError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    if role == "pic" and not unit:
        raise UserError("a pic belongs to one unit: give --unit")
    if role != "pic" and unit:
        raise UserError(f"only a pic is limited to a unit, not a {role}")
    if password is not None:
        check_password_strength(password)
    hashed = _hasher.hash(password) if password is not None else None
    at = now_ts()
    with store.tx() as db:
        if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise UserError(f"user {name!r} exists already")
        if unit and not db.execute("SELECT 1 FROM units WHERE id = ?", (unit,)).fetchone():
            raise UserError(f"unit {unit!r} is not in the registry (units come from the registry file: load it "
                            "first)")
        db.execute("INSERT INTO users (name, role, unit, password, disabled, created_at) VALUES (?,?,?,?,0,?)",
                   (name, role, unit, hashed, at))
        audit.append(db, at, by, None, "user.added", {"user": name, "role": role, "unit": unit})
    return User(name, role, unit)


def set_password(store: Store, name: str, password: str, by: str) -> None:
    check_password_strength(password)
    hashed = _hasher.hash(password)
    at = now_ts()
    with store.tx() as db:
        if db.execute("UPDATE users SET password = ? WHERE name = ?", (hashed, name)).rowcount != 1:
            raise UserError(f"no user {name!r}")
        db.execute("DELETE FROM sessions WHERE \"user\" = ?", (name,))
        audit.append(db, at, by, None, "user.password_set", {"user": name})


def disable(store: Store, name: str, by: str) -> None:
    """Disable an account: its sessions end and its tokens stop working at once."""
    at = now_ts()
    with store.tx() as db:
        if db.execute("UPDATE users SET disabled = 1 WHERE name = ?", (name,)).rowcount != 1:
            raise UserError(f"no user {name!r}")
        db.execute("DELETE FROM sessions WHERE \"user\" = ?", (name,))
        db.execute("DELETE FROM tokens WHERE \"user\" = ?", (name,))
        audit.append(db, at, by, None, "user.disabled", {"user": name})


def listing(store: Queryable) -> list[dict[str, Any]]:
    rows = store.query("SELECT name, role, unit, disabled, created_at, password IS NOT NULL AS has_password "
                       "FROM users ORDER BY name")
    for r in rows:
        r["disabled"] = bool(r["disabled"])
        r["has_password"] = bool(r["has_password"])
        r["tokens"] = store.query("SELECT count(*) AS n FROM tokens WHERE \"user\" = ? AND kind = 'api'",
                                  (r["name"],))[0]["n"]
    return rows


def get(store: Queryable, name: str) -> User | None:
    rows = store.query("SELECT name, role, unit FROM users WHERE name = ? AND disabled = 0", (name,))
    return _row_user(rows[0]) if rows else None


def any_admin(store: Queryable) -> str | None:
    rows = store.query("SELECT name FROM users WHERE role = 'admin' AND disabled = 0 ORDER BY created_at, name "
                       "LIMIT 1")
    return rows[0]["name"] if rows else None


# ---------------------------------------------------------------- passwords and failed logins


def failures_wait(store: Queryable, username: str, remote: str, now: float | None = None) -> float:
    """Seconds until another attempt is allowed for this user name / address; 0 when allowed now."""
    now = time.time() if now is None else now
    since = now - FAIL_WINDOW_S
    wait = 0.0
    for col, value, limit in (("username", username, MAX_FAILS_PER_USER), ("remote", remote, MAX_FAILS_PER_ADDRESS)):
        rows = store.query(f"SELECT at FROM login_failures WHERE {col} = ? AND at >= ? ORDER BY at DESC LIMIT ?",
                           (value, since, limit))
        if len(rows) >= limit:
            wait = max(wait, rows[-1]["at"] + FAIL_WINDOW_S - now)
    return max(0.0, wait)


def record_failure(store: Store, username: str, remote: str, now: float | None = None) -> int:
    """Count a failed (or not yet checked) attempt; returns its row, for ``forget_failure``."""
    now = time.time() if now is None else now
    with store.tx() as db:
        cur = db.execute("INSERT INTO login_failures (at, username, remote) VALUES (?,?,?)",
                         (now, username[:128], remote))
        db.execute("DELETE FROM login_failures WHERE at < ?", (now - 86400,))
        return int(cur.lastrowid or 0)


def forget_failure(store: Store, row: int) -> None:
    """An attempt counted before its check turned out right."""
    with store.tx() as db:
        db.execute("DELETE FROM login_failures WHERE rowid = ?", (row,))


def check_password(store: Store, name: str, password: str) -> User | None:
    """The user if ``password`` is theirs and the account is enabled (constant work either way)."""
    rows = store.query("SELECT name, role, unit, password FROM users WHERE name = ? AND disabled = 0", (name,))
    stored = rows[0]["password"] if rows and rows[0]["password"] else None
    try:
        _hasher.verify(stored or _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if stored is None:
        return None
    if _hasher.check_needs_rehash(stored):
        with store.tx() as db:
            db.execute("UPDATE users SET password = ? WHERE name = ?", (_hasher.hash(password), name))
    with store.tx() as db:
        db.execute("DELETE FROM login_failures WHERE username = ?", (name,))
    return _row_user(rows[0])


# ---------------------------------------------------------------- sessions


def new_session(store: Store, user: User, ttl_s: float) -> tuple[str, str]:
    """(session token for the cookie, CSRF token for the page)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    now = time.time()
    with store.tx() as db:
        db.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
        db.execute("INSERT INTO sessions (id, \"user\", csrf, created_at, expires_at) VALUES (?,?,?,?,?)",
                   (_sha(token), user.name, csrf, now, now + ttl_s))
    return token, csrf


def session(store: Queryable, token: str) -> tuple[User, str] | None:
    """(user, CSRF token) of a live session of an enabled account."""
    rows = store.query("SELECT u.name, u.role, u.unit, s.csrf FROM sessions s JOIN users u ON u.name = s.\"user\" "
                       "WHERE s.id = ? AND s.expires_at > ? AND u.disabled = 0", (_sha(token), time.time()))
    return (_row_user(rows[0]), rows[0]["csrf"]) if rows else None


def end_session(store: Store, token: str) -> None:
    with store.tx() as db:
        db.execute("DELETE FROM sessions WHERE id = ?", (_sha(token),))


# ---------------------------------------------------------------- tokens


def new_token(store: Store, name: str, label: str, by: str, kind: str = "api") -> str:
    """An API token (kind ``api``, no expiry) or a one-time sign-in token (``once``, 24 h); shown once."""
    token = ("pt_" if kind == "api" else "po_") + secrets.token_urlsafe(32)
    now = time.time()
    with store.tx() as db:
        if not db.execute("SELECT 1 FROM users WHERE name = ? AND disabled = 0", (name,)).fetchone():
            raise UserError(f"no enabled user {name!r}")
        db.execute("INSERT INTO tokens (id, \"user\", kind, label, created_at, expires_at) VALUES (?,?,?,?,?,?)",
                   (_sha(token), name, kind, label[:120], now, now + ONCE_TTL_S if kind == "once" else None))
        audit.append(db, now_ts(), by, None, "token.created", {"user": name, "kind": kind, "label": label[:120]})
    return token


def token_user(store: Queryable, token: str) -> User | None:
    """The owner of a live API token."""
    rows = store.query("SELECT u.name, u.role, u.unit FROM tokens t JOIN users u ON u.name = t.\"user\" "
                       "WHERE t.id = ? AND t.kind = 'api' AND u.disabled = 0", (_sha(token),))
    if not rows:
        return None
    return _row_user(rows[0])


def use_once(store: Store, token: str) -> User | None:
    """Spend a one-time sign-in token: its user, or None if unknown, used or expired."""
    with store.tx() as db:
        row = db.execute("SELECT u.name, u.role, u.unit FROM tokens t JOIN users u ON u.name = t.\"user\" "
                         "WHERE t.id = ? AND t.kind = 'once' AND t.expires_at > ? AND u.disabled = 0",
                         (_sha(token), time.time())).fetchone()
        db.execute("DELETE FROM tokens WHERE id = ? AND kind = 'once'", (_sha(token),))
    return User(row[0], row[1], row[2]) if row else None
