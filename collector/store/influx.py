"""Time series to InfluxDB through influxdb-client, never losing a refused batch.

The WriteApi runs in batching mode; in that mode a refused write does not raise, it only
calls ``error_callback`` (and logs). So every refused batch goes, as line protocol, into a
local SQLite buffer and is re-sent synchronously by ``retry_buffer()`` until the server takes
it. Counters say how much was written, refused, buffered and re-sent.

Schema (docs/storage.md): measurement ``pantau_host`` (fields cpu_pct, mem_pct, disk_pct,
uptime_s, temp_c) and ``pantau_device`` (fields present and in_use as 0/1, errors_total,
resets_total, speed_rank); tags agent, unit, room, and for devices device (the key) and kind.
Status is numeric, never a string field.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import defaultdict
from typing import Any, cast

from influxdb_client import InfluxDBClient, Point, WriteOptions, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

_MS: Any = WritePrecision.MS  # a str constant the stubs type as the enum

log = logging.getLogger(__name__)


class InfluxSink:
    def __init__(self, url: str, token: str, org: str, bucket: str, buffer_path: str,
                 batch_size: int = 1000, flush_interval_ms: int = 1000) -> None:
        self.url, self.bucket, self.org = url, bucket, org or "pantau"
        self.client = InfluxDBClient(url=url, token=token or "-", org=self.org, timeout=10_000)
        self.write_api = self.client.write_api(
            write_options=WriteOptions(batch_size=batch_size, flush_interval=flush_interval_ms,
                                       max_retries=3, retry_interval=1000, max_retry_delay=5000,
                                       max_retry_time=20_000, exponential_base=2),
            success_callback=self._on_success, error_callback=self._on_error, retry_callback=self._on_retry)
        self.sync_api = self.client.write_api(write_options=SYNCHRONOUS)
        os.makedirs(os.path.dirname(os.path.abspath(buffer_path)), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(buffer_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY, bucket TEXT, org TEXT, "
                         "precision TEXT, data BLOB NOT NULL, lines INTEGER NOT NULL, attempts INTEGER DEFAULT 0)")
        self.written_lines = 0
        self.refused_batches = 0
        self.resent_lines = 0

    # ------------------------------------------------------------------ callbacks
    def _on_success(self, conf: tuple[str, str, str], data: str | bytes) -> None:
        self.written_lines += _count(data)

    def _on_retry(self, conf: tuple[str, str, str], data: str | bytes, exc: Exception) -> None:
        log.info("InfluxDB write will be retried: %s", exc)

    def _on_error(self, conf: tuple[str, str, str], data: str | bytes, exc: Exception) -> None:
        self.refused_batches += 1
        raw = data.encode() if isinstance(data, str) else bytes(data)
        with self._lock:
            self._db.execute("INSERT INTO batches (bucket, org, precision, data, lines) VALUES (?,?,?,?,?)",
                             (conf[0], conf[1], str(conf[2]), raw, _count(raw)))
        log.warning("InfluxDB refused a batch of %d points (%s); kept in the local buffer for retry",
                    _count(raw), str(exc).splitlines()[0][:200])

    # ------------------------------------------------------------------ writing
    def add(self, agent: str, rows: list[tuple[float, str, str, str, float]], labels: dict[str, str],
            kinds: dict[str, str] | None = None) -> None:
        """Rows are (ts, agent, device, metric, value); one point per (ts, device)."""
        grouped: dict[tuple[float, str], dict[str, float]] = defaultdict(dict)
        for t, _, device, metric, value in rows:
            grouped[(t, device)][metric] = value
        points = []
        for (t, device), fields in grouped.items():
            host = device == "_host"
            p = Point("pantau_host" if host else "pantau_device").tag("agent", agent)
            for k in ("unit", "room"):
                if labels.get(k):
                    p = p.tag(k, labels[k])
            if not host:
                p = p.tag("device", device).tag("kind", (kinds or {}).get(device, "unknown"))
            for k, v in fields.items():
                p = p.field(k, int(v) if k in ("present", "in_use", "speed_rank") else float(v))
            points.append(p.time(int(t * 1000), WritePrecision.MS))
        if points:
            self.write_api.write(bucket=self.bucket, org=self.org, record=points, write_precision=_MS)

    def flush(self) -> None:
        self.write_api.flush()

    def retry_buffer(self, limit: int = 100) -> int:
        """Re-send buffered batches, oldest first; stops at the first refusal. Returns lines sent."""
        sent = 0
        with self._lock:
            rows = self._db.execute("SELECT id, bucket, org, precision, data, lines FROM batches ORDER BY id "
                                    "LIMIT ?", (limit,)).fetchall()
        for rid, bucket, org, precision, data, lines in rows:
            try:
                self.sync_api.write(bucket=bucket, org=org, record=bytes(data).decode(),
                                    write_precision=cast(Any, _precision(precision)))
            except Exception as exc:
                with self._lock:
                    self._db.execute("UPDATE batches SET attempts = attempts + 1 WHERE id = ?", (rid,))
                log.info("InfluxDB still refuses buffered data: %s", str(exc).splitlines()[0][:200])
                break
            with self._lock:
                self._db.execute("DELETE FROM batches WHERE id = ?", (rid,))
            sent += lines
        self.resent_lines += sent
        return sent

    def buffer_depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT coalesce(sum(lines), 0) FROM batches").fetchone()[0])

    def close(self) -> None:
        self.write_api.close()  # flushes; refusals land in the buffer through _on_error
        self.client.close()
        with self._lock:
            self._db.close()


def _count(data: str | bytes) -> int:
    raw = data.encode() if isinstance(data, str) else data
    return sum(1 for line in raw.split(b"\n") if line.strip())


def _precision(p: Any) -> str:
    s = str(p).lower()
    for name in ("ns", "us", "ms", "s"):
        if s.endswith(name):
            return name
    return "ns"
