"""Collector configuration: flat TOML, every key overridable by ``PANTAU_<KEY>``; one clear line on error."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from collector.policy import Windows
from common.config import ConfigError, parse_broker, read_toml


@dataclass(frozen=True)
class CollectorConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    client_id: str = "pantau-collector"
    share_group: str | None = None
    ingest_workers: str = "1"  # > 1: that many worker processes on an MQTT 5 shared subscription
    prefix: str = "pantau"
    mqtt_version: str = "auto"  # auto (5, falling back to 3.1.1) | 5 | 3.1.1
    db: str = "var/pantau.sqlite"
    http: str = "127.0.0.1:8080"
    registry: str | None = None
    lang: str = "id"
    influx_url: str | None = None
    influx_token: str | None = None
    influx_org: str | None = None
    influx_bucket: str | None = None
    influx_buffer: str = "var/influx-buffer.sqlite"
    smtp_host: str | None = None
    smtp_port: str = "25"
    smtp_from: str = "pantau@localhost"
    central_it_email: str | None = None  # comma-separated
    webhook_url: str | None = None
    notify_delay_s: str = "60"
    dashboard_url: str | None = None
    windows: Windows = field(default_factory=Windows)

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host or "127.0.0.1", int(port)


def load(path: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> CollectorConfig:
    env = dict(os.environ if env is None else env)
    names = {f.name for f in fields(CollectorConfig)}
    values: dict[str, Any] = {}
    path = path or env.get("PANTAU_COLLECTOR_CONFIG")
    if path:
        for k, v in read_toml(path).items():
            if k not in names:
                raise ConfigError(f"config: {k}: unknown key (known: {', '.join(sorted(names))})")
            if k == "windows":
                if not isinstance(v, dict):
                    raise ConfigError("config: windows: must be a table")
                try:
                    values[k] = Windows.from_mapping(v)
                except ValueError as exc:
                    raise ConfigError(f"config: {exc}") from None
            elif not isinstance(v, str):
                raise ConfigError(f"config: {k}: must be a string")
            else:
                values[k] = v
    for name in names - {"windows"}:
        ev = env.get(f"PANTAU_{name.upper()}")
        if ev:
            values[name] = ev
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = CollectorConfig(**values)
    parse_broker(cfg.broker)
    try:
        _, port = cfg.http_host_port
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"config: http: {cfg.http!r} must look like 127.0.0.1:8080") from None
    if cfg.mqtt_version not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"config: mqtt_version: {cfg.mqtt_version!r} must be auto, 5 or 3.1.1")
    if cfg.lang not in ("id", "en"):
        raise ConfigError(f"config: lang: {cfg.lang!r} must be id or en")
    if not cfg.ingest_workers.isdigit() or not 1 <= int(cfg.ingest_workers) <= 32:
        raise ConfigError(f"config: ingest_workers: {cfg.ingest_workers!r} must be a whole number from 1 to 32")
    for key in ("smtp_port", "notify_delay_s"):
        try:
            if float(getattr(cfg, key)) < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"config: {key}: {getattr(cfg, key)!r} must be a non-negative number") from None
    if cfg.influx_url and not cfg.influx_bucket:
        raise ConfigError("config: influx_bucket: needed when influx_url is set")
    return cfg
