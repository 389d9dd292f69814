"""Append-only, keyed, hash-chained audit log of every decision and every change people make.

Each entry carries an HMAC-SHA256 over its position, the previous entry's MAC and its own content,
under a secret kept outside the database (the *audit key file*, created 0600 on first use). Editing
or deleting an entry breaks every link after it, and someone holding the database but not the key
cannot recompute the chain: ``verify`` names the first entry that does not match.

The key for a database is the one ``configure`` was given, else ``audit.key`` beside the database
file. Entries written before a key existed (an unkeyed SHA-256 chain from older releases) are sealed
with the key once, when the key file is created, if that older chain is intact.

``python -m collector.audit DB [KEYFILE]`` verifies from its own read-only connection and prints one
JSON object: the web API runs it as a separate process so a long check never competes with ingest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import sys
import threading
from typing import Any

from collector.store import is_postgres

log = logging.getLogger(__name__)
GENESIS = "0" * 64
KEY_FILE_NAME = "audit.key"

_keys: dict[str, bytes] = {}  # absolute database path -> key
_key_files: dict[str, str] = {}  # absolute database path -> key file configured for it
_lock = threading.Lock()
_EPHEMERAL = os.urandom(32)  # for in-memory databases: nothing outlives the process anyway


class AuditKeyError(ValueError):
    pass


def _ident(db_path: str) -> str:
    """What names a database: a file's absolute path, or a PostgreSQL connection string as given."""
    return db_path if is_postgres(db_path) else os.path.abspath(db_path)


def default_key_file(db_path: str) -> str:
    if is_postgres(db_path):  # several collectors share it: each must be given the same key file
        raise AuditKeyError("audit: with a PostgreSQL database, set audit_key_file (the same key on every "
                            "collector)")
    return os.path.join(os.path.dirname(os.path.abspath(db_path)), KEY_FILE_NAME)


def read_key(path: str) -> bytes:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError as exc:
        raise AuditKeyError(f"audit: cannot read key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise AuditKeyError(f"audit: key file {path} must hold at least 64 hex digits")
    return key


def _load_or_create(path: str) -> tuple[bytes, bool]:
    """(key, created now)."""
    if os.path.exists(path):
        mode = os.stat(path).st_mode
        if mode & 0o077:
            log.warning("audit key file %s is readable by others (mode %o): chmod 600 it", path, mode & 0o777)
        return read_key(path), False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return read_key(path), False
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
    log.info("audit: created key file %s (keep it, and keep it out of database backups)", path)
    return key, True


def _db_path(db: sqlite3.Connection) -> str:
    name = getattr(db, "name", None)  # a PostgreSQL store's connection names its database itself
    if isinstance(name, str):
        return name
    row = db.execute("PRAGMA database_list").fetchone()
    return os.path.abspath(row[2]) if row and row[2] else ""


def configure(db_path: str, key_file: str | None = None) -> bytes:
    """Use ``key_file`` (default: beside the database) for the chain in ``db_path``; create it if absent,
    sealing any entries written before it existed. Returns the key."""
    path = _ident(db_path)
    kf = key_file or default_key_file(path)
    with _lock:
        key, created = _load_or_create(kf)
        _keys[path] = key
        _key_files[path] = kf
    if created and not is_postgres(path) and os.path.exists(path):
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("BEGIN IMMEDIATE")
            try:
                _seal_legacy(db, key)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
        finally:
            db.close()
    return key


def key_file_for(db_path: str) -> str:
    path = _ident(db_path)
    with _lock:
        return _key_files.get(path) or default_key_file(path)


def _key_for(db: sqlite3.Connection, create: bool = True) -> bytes:
    """The key of the database ``db`` is connected to (inside its transaction when called by append)."""
    path = _db_path(db)
    if not path:
        return _EPHEMERAL
    with _lock:
        key = _keys.get(path)
        if key is not None:
            return key
        if not create:
            return read_key(default_key_file(path))
        key, created = _load_or_create(default_key_file(path))
        _keys[path] = key
        _key_files[path] = default_key_file(path)
    if created:
        _seal_legacy(db, key)
    return key


def _mac(key: bytes, rid: int, prev: str, at: str, actor: str, incident: str | None, action: str,
         detail: str) -> str:
    body = json.dumps([rid, prev, at, actor, incident, action, detail], separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _legacy_digest(prev: str, at: str, actor: str, incident: str | None, action: str, detail: str) -> str:
    body = json.dumps([prev, at, actor, incident, action, detail], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _seal_legacy(db: sqlite3.Connection, key: bytes) -> None:
    """Re-link entries of an unkeyed chain under ``key`` — only when the key is new and the old chain intact."""
    rows = db.execute("SELECT id, at, actor, incident, action, detail, prev_hash, hash FROM audit ORDER BY id"
                      ).fetchall()
    if not rows:
        return
    prev = GENESIS
    for _rid, at, actor, incident, action, detail, prev_hash, h in rows:
        if prev_hash != prev or _legacy_digest(prev, at, actor, incident, action, detail) != h:
            log.error("audit: the existing unkeyed chain is broken at entry %s; it was not sealed with the new key",
                      _rid)
            return
        prev = h
    prev = GENESIS
    for rid, at, actor, incident, action, detail, _p, _h in rows:
        h = _mac(key, rid, prev, at, actor, incident, action, detail)
        db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, h, rid))
        prev = h
    log.info("audit: sealed %d earlier entries with the new key", len(rows))


def append(db: sqlite3.Connection, at: str, actor: str, incident: str | None, action: str,
           detail: dict[str, Any]) -> str:
    """Add one entry; call inside the transaction that makes the change it records."""
    key = _key_for(db)
    row = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    rid, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    d = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = _mac(key, rid, prev, at, actor, incident, action, d)
    db.execute("INSERT INTO audit (id, at, actor, incident, action, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
               (rid, at, actor, incident, action, d, prev, h))
    return h


def _check(key: bytes, cur: sqlite3.Cursor) -> tuple[int, int | None, str]:
    prev = GENESIS
    n = 0
    expected_id = 1
    for rid, at, actor, incident, action, detail, prev_hash, h in cur:
        n += 1
        if prev_hash != prev or rid != expected_id:
            return n, rid, f"entry {rid}: its link to the previous entry is broken (an entry was removed or altered)"
        if not hmac.compare_digest(_mac(key, rid, prev, at, actor, incident, action, detail), h):
            return n, rid, f"entry {rid}: its content does not match its keyed hash (it was altered)"
        prev = h
        expected_id = rid + 1
    return n, None, "chain intact"


_SELECT = "SELECT id, at, actor, incident, action, detail, prev_hash, hash FROM audit ORDER BY id"


def verify(db: sqlite3.Connection) -> tuple[int, int | None, str]:
    """(entries checked, id of the first broken entry or None, explanation), on ``db`` itself."""
    return _check(_key_for(db, create=False), db.execute(_SELECT))


def verify_file(db_path: str, key_file: str | None = None) -> tuple[int, int | None, str]:
    """Verify from a read-only connection of its own, on one snapshot: never blocks writers (WAL)."""
    kf = key_file or key_file_for(db_path)
    key = read_key(kf)
    if is_postgres(db_path):
        import psycopg

        with psycopg.connect(db_path, autocommit=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")  # one snapshot
            result = _check(key, conn.execute(_SELECT))  # type: ignore[arg-type]
            conn.execute("COMMIT")
            return result
    if not os.path.exists(db_path):
        raise AuditKeyError(f"audit: no database at {db_path}")
    uri = "file:" + os.path.abspath(db_path).replace("?", "%3f").replace("#", "%23") + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("BEGIN")  # one read transaction: one snapshot from the first read on
        result = _check(key, db.execute(_SELECT))
        db.execute("COMMIT")
        return result
    finally:
        db.close()


def yield_cpu() -> None:
    """A verification is background work: let ingest have the processor first."""
    if hasattr(os, "nice"):
        try:
            os.nice(10)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    yield_cpu()
    if args and args[0] == "-":  # the database named by PANTAU_AUDIT_DB (a connection string stays off argv)
        args = [os.environ.get("PANTAU_AUDIT_DB", ""), *args[1:]]
    if not 1 <= len(args) <= 2 or not args[0]:
        print("usage: python -m collector.audit DB|- [KEYFILE]", file=sys.stderr)
        return 2
    try:
        n, broken, why = verify_file(args[0], args[1] if len(args) > 1 else None)
    except (AuditKeyError, sqlite3.Error) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    except Exception as exc:  # psycopg's errors: the server refused or is away
        print(json.dumps({"error": f"audit: {type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps({"entries": n, "first_broken": broken, "message": why}))
    return 0 if broken is None else 1


if __name__ == "__main__":
    sys.exit(main())
