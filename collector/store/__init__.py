"""The collector's stores: SQLite (the embedded default) or PostgreSQL (``postgresql://...``), one interface.

``open_store`` picks one by the ``db`` setting (``PANTAU_DB`` overrides it); ``store_failure`` tells an
error of the store itself (full disk, lost connection, a lock) from an error a message caused.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

from collector.store.sqlite import LostLead, Retention, SqliteStore, StoreError

Store = Any  # SqliteStore or PostgresStore: the same methods (see each module)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str) -> bool:
    return db.startswith(POSTGRES_SCHEMES)


def open_store(db: str, retention: Retention | None = None) -> Store:
    if is_postgres(db):
        from collector.store.postgres import PostgresStore

        return PostgresStore(db, retention)
    return SqliteStore(db, retention)


def store_failure(exc: BaseException) -> bool:
    """Errors of the store itself: the batch is retried, never dead-lettered."""
    if isinstance(exc, sqlite3.OperationalError | MemoryError | LostLead) or type(exc) is sqlite3.DatabaseError:
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.OperationalError | psycopg.errors.InFailedSqlTransaction)


__all__ = ["LostLead", "Retention", "SqliteStore", "Store", "StoreError", "is_postgres", "open_store", "store_failure"]
