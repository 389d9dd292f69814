"""What the web side needs from the configuration, in one small value (tests build it directly)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from collector.fleet import FleetSettings


@dataclass(frozen=True)
class WebSettings:
    session_s: float = 12 * 3600.0
    proxy_header: str | None = None  # an authenticating reverse proxy's user header; None: not trusted
    proxy_from: tuple[str, ...] = ("127.0.0.1", "::1")  # whose X-Forwarded-* and user header are believed
    metrics_require_token: bool = False
    request_timeout_s: float = 10.0  # a whole request (headers and body) must arrive within this
    keep_alive_s: int = 5
    max_connections: int = 4096
    public_origins: tuple[str, ...] = field(default_factory=tuple)  # e.g. the dashboard_url's origin
    registry_path: str | None = None  # for POST /api/registry/reload
    audit_key_file: str | None = None
    fleet: FleetSettings = field(default_factory=FleetSettings)  # offline/clock flags, working hours

    @classmethod
    def from_config(cls, cfg: Any) -> WebSettings:
        origins: tuple[str, ...] = ()
        if cfg.dashboard_url:
            u = urlsplit(cfg.dashboard_url)
            origins = (f"{u.scheme}://{u.netloc}".lower(),)
        return cls(session_s=float(cfg.session_hours) * 3600, proxy_header=cfg.auth_proxy_header,
                   proxy_from=tuple(str(ipaddress.ip_address(a.strip())) for a in cfg.auth_proxy_from.split(",")),
                   metrics_require_token=bool(cfg.metrics_require_token),
                   request_timeout_s=float(cfg.http_request_timeout_s), max_connections=int(cfg.http_max_connections),
                   public_origins=origins, registry_path=cfg.registry, audit_key_file=cfg.audit_key_file,
                   fleet=fleet_settings(cfg))


def fleet_settings(cfg: Any) -> FleetSettings:
    """Offline and clock flags from the configuration's keys where it has them (defaults otherwise)."""
    d = FleetSettings()
    days = getattr(cfg, "work_days", None)
    return FleetSettings(
        offline_after_s=float(getattr(cfg, "offline_after_s", None) or d.offline_after_s),
        work_start_h=int(getattr(cfg, "work_start_h", None) or d.work_start_h),
        work_end_h=int(getattr(cfg, "work_end_h", None) or d.work_end_h),
        work_days=tuple(int(x) for x in str(days).split(",")) if days else d.work_days,
        tz_offset_h=float(getattr(cfg, "tz_offset_h", None) or d.tz_offset_h))
