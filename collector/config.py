"""Collector configuration: flat TOML, every key overridable by ``PANTAU_<KEY>``; values coerced to their
types (``smtp_port = 587`` and ``smtp_port = "587"`` alike); one clear line naming the key on error."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from collector.policy import Windows
from collector.store import is_postgres
from common.config import ConfigError, name_the_source, parse_broker, read_toml
from common.protocol import check_prefix


@dataclass(frozen=True)
class CollectorConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    client_id: str = "pantau-collector"
    share_group: str | None = None
    # MQTT receiver processes on a shared subscription, validating for this process's single writer;
    # 0: receive in this process (brokers without shared subscriptions, such as the demo's)
    receivers: int = 2
    prefix: str = "pantau"
    mqtt_version: str = "auto"  # auto (5, falling back to 3.1.1) | 5 | 3.1.1
    db: str = "var/pantau.sqlite"  # or postgresql://user:password@host/dbname (PANTAU_DB)
    http: str = "127.0.0.1:8080"
    registry: str | None = None
    lang: str = "id"
    influx_url: str | None = None
    influx_token: str | None = None
    influx_org: str | None = None
    influx_bucket: str | None = None
    influx_buffer: str = "var/influx-buffer.sqlite"
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "pantau@localhost"
    central_it_email: str | None = None  # comma-separated
    webhook_url: str | None = None
    notify_delay_s: float = 60.0
    notify_fleet: bool = True  # also announce room PCs offline too long and clocks off (docs/dashboard.md)
    dashboard_url: str | None = None
    audit_key_file: str | None = None  # default: audit.key beside the database
    session_hours: float = 12.0
    auth_proxy_header: str | None = None  # e.g. X-Remote-User, set by an authenticating reverse proxy
    auth_proxy_from: str = "127.0.0.1,::1"  # the proxy's addresses: the header is ignored from others
    metrics_require_token: bool = False
    http_request_timeout_s: float = 10.0
    http_max_connections: int = 4096
    # HTTPS for the dashboard, the API and enrollment (docs/enrollment.md); both or neither
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    public_url: str | None = None  # how room PCs reach the collector, e.g. https://pantau.example.go.id:8443
    dynsec_username: str | None = None  # the broker account holding the dynamic security admin role
    dynsec_password: str | None = None
    dynsec_broker: str | None = None  # default: broker
    agent_broker: str | None = None  # the broker URL given to enrolled agents; default: broker
    agent_ca_file: str | None = None  # the CA given to enrolled agents; default: ca_file
    bundle_dir: str = "var/bundle"  # the agent's wheels and install script (pantau-collector bundle)
    enroll_expires_h: float = 24.0
    # the fleet view: a room PC silent this long in working hours is flagged offline (docs/dashboard.md)
    offline_after_s: float = 7200.0
    work_start_h: int = 7
    work_end_h: int = 17
    work_days: str = "0,1,2,3,4"  # Monday = 0
    tz_offset_h: float = 7.0  # WIB
    windows: Windows = field(default_factory=Windows)

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host or "127.0.0.1", int(port)


# key -> (type, lowest allowed, highest allowed)
_INTS: dict[str, tuple[int, int]] = {"receivers": (0, 32), "smtp_port": (1, 65535),
                                     "http_max_connections": (16, 1_000_000), "work_start_h": (0, 23),
                                     "work_end_h": (1, 24)}
_FLOATS: dict[str, tuple[float, float]] = {"notify_delay_s": (0.0, 86400.0 * 7), "session_hours": (0.01, 24.0 * 90),
                                           "http_request_timeout_s": (0.5, 3600.0),
                                           "enroll_expires_h": (0.01, 24.0 * 90),
                                           "offline_after_s": (60.0, 86400.0 * 30), "tz_offset_h": (-12.0, 14.0)}
_BOOLS = {"metrics_require_token", "notify_fleet"}
_TRUE = ("true", "1", "yes", "on")


def _coerce(name: str, value: Any, from_env: bool) -> Any:
    src = f"PANTAU_{name.upper()}" if from_env else name
    try:
        if name in _INTS:
            lo, hi = _INTS[name]
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 5.0 is a whole number; 2.7 is not
            if isinstance(value, bool | float) or (
                    isinstance(value, str) and not value.strip().lstrip("+").isdigit()):
                raise ValueError
            iv = int(value)
            if not lo <= iv <= hi:
                raise ValueError
            return iv
        if name in _FLOATS:
            flo, fhi = _FLOATS[name]
            if isinstance(value, bool):
                raise ValueError
            fv = float(value)
            if not flo <= fv <= fhi:  # also refuses nan
                raise ValueError
            return fv
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            word = value.strip().lower() if isinstance(value, str) else ""
            if word in _TRUE or word in ("false", "0", "no", "off"):
                return word in _TRUE
            raise TypeError
    except ValueError:
        if name in _INTS:
            lo, hi = _INTS[name]
            raise ConfigError(f"config: {src}: {value!r} must be a whole number from {lo} to {hi}") from None
        flo, fhi = _FLOATS[name]
        raise ConfigError(f"config: {src}: {value!r} must be a number from {flo:g} to {fhi:g}") from None
    except TypeError:
        raise ConfigError(f"config: {src}: {value!r} must be true or false") from None
    if name == "mqtt_version" and value == 5 and not isinstance(value, bool):
        return "5"  # mqtt_version = 5, a TOML number
    if not isinstance(value, str):
        raise ConfigError(f"config: {src}: {value!r} must be a string")
    return value


def load(path: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> CollectorConfig:
    env = dict(os.environ if env is None else env)
    names = {f.name for f in fields(CollectorConfig)}
    values: dict[str, Any] = {}
    path = path or env.get("PANTAU_COLLECTOR_CONFIG")
    if path:
        for k, v in read_toml(path).items():
            if k == "ingest_workers":
                raise ConfigError("config: ingest_workers: replaced by receivers (MQTT receiver processes feeding "
                                  "one writer; 0 receives in the collector's own process)")
            if k not in names:
                raise ConfigError(f"config: {k}: unknown key (known: {', '.join(sorted(names))})")
            if k == "windows":
                if not isinstance(v, dict):
                    raise ConfigError("config: windows: must be a table")
                try:
                    values[k] = Windows.from_mapping(v)
                except ValueError as exc:
                    raise ConfigError(f"config: {exc}") from None
            else:
                values[k] = _coerce(k, v, False)
    from_env: set[str] = set()
    for name in names - {"windows"}:
        ev = env.get(f"PANTAU_{name.upper()}")
        if ev:
            values[name] = _coerce(name, ev, True)
            from_env.add(name)
    given = {k: _coerce(k, v, False) if k != "windows" else v for k, v in overrides.items() if v is not None}
    values.update(given)
    cfg = CollectorConfig(**values)
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise name_the_source(exc, from_env - set(given)) from None
    return cfg


def _validate(cfg: CollectorConfig) -> None:
    parse_broker(cfg.broker)
    try:
        _, port = cfg.http_host_port
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"config: http: {cfg.http!r} must look like 127.0.0.1:8080") from None
    if cfg.mqtt_version not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"config: mqtt_version: {cfg.mqtt_version!r} must be auto, 5 or 3.1.1")
    try:
        check_prefix(cfg.prefix)
    except ValueError as exc:
        raise ConfigError(f"config: prefix: {exc}") from None
    if cfg.lang not in ("id", "en"):
        raise ConfigError(f"config: lang: {cfg.lang!r} must be id or en")
    if cfg.influx_url and not cfg.influx_bucket:
        raise ConfigError("config: influx_bucket: needed when influx_url is set")
    if cfg.auth_proxy_header is not None and not _HEADER_RE.match(cfg.auth_proxy_header):
        raise ConfigError(f"config: auth_proxy_header: {cfg.auth_proxy_header!r} is not an HTTP header name")
    for addr in cfg.auth_proxy_from.split(","):
        try:
            ipaddress.ip_address(addr.strip())
        except ValueError:
            raise ConfigError(f"config: auth_proxy_from: {addr.strip()!r} is not an IP address") from None
    if cfg.dashboard_url is not None and not re.match(r"^https?://[^/\s]+", cfg.dashboard_url):
        raise ConfigError(f"config: dashboard_url: {cfg.dashboard_url!r} must look like https://pantau.example.go.id/")
    if bool(cfg.tls_cert_file) != bool(cfg.tls_key_file):
        raise ConfigError("config: tls_cert_file and tls_key_file: give both, or neither")
    for k in ("dynsec_broker", "agent_broker"):
        if getattr(cfg, k):
            parse_broker(getattr(cfg, k), k)
    if cfg.public_url is not None and not re.match(r"^https://[^/\s]+/?$", cfg.public_url):
        raise ConfigError(f"config: public_url: {cfg.public_url!r} must look like https://pantau.example.go.id:8443")
    days = [d.strip() for d in cfg.work_days.split(",") if d.strip()]
    if not days or not all(d in "0123456" and len(d) == 1 for d in days):
        raise ConfigError(f"config: work_days: {cfg.work_days!r} must be weekday numbers 0-6 (Monday = 0), "
                          "comma-separated")
    if cfg.work_start_h >= cfg.work_end_h:
        raise ConfigError("config: work_start_h: must be before work_end_h")
    if is_postgres(cfg.db) and not cfg.audit_key_file:
        raise ConfigError("config: audit_key_file: needed with a PostgreSQL db (give every collector the same key "
                          "file)")
    if "://" in cfg.db and not is_postgres(cfg.db):
        raise ConfigError(f"config: db: {cfg.db.split('://')[0]}:// is not a store: give a file path or "
                          "postgresql://user:password@host/dbname")


_HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
