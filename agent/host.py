"""Host gauges for telemetry (psutil)."""

from __future__ import annotations

import time
from typing import Any

import psutil

from common.protocol import format_epoch


def host_boot_ts() -> str:
    return format_epoch(psutil.boot_time())


def _temperature() -> float | None:
    try:
        temps = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    values = [t.current for entries in temps.values() for t in entries if t.current]
    return round(max(values), 1) if values else None


def gauges(disk_path: str = "/") -> dict[str, Any]:
    try:
        disk = psutil.disk_usage(disk_path).percent
    except OSError:
        disk = None
    return {
        "cpu_pct": psutil.cpu_percent(interval=None),
        "mem_pct": psutil.virtual_memory().percent,
        "disk_pct": disk,
        "uptime_s": int(time.time() - psutil.boot_time()),
        "temp_c": _temperature(),
    }
