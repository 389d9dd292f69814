"""Agent configuration: a flat TOML file, every key overridable by ``PANTAU_<KEY>``.

Validated on start; a bad value stops the agent with one line naming the key.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from agent.usage import DEFAULT_MEETING_PROCESSES
from common.config import Broker, ConfigError, name_the_source, parse_broker, read_toml
from common.protocol import DEFAULT_PREFIX, check_prefix, valid_agent_id


def _default_id() -> str:
    name = socket.gethostname().lower()
    cleaned = "".join(c if c in "abcdefghijklmnopqrstuvwxyz0123456789-_." else "-" for c in name)[:64]
    return cleaned or "agent"


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str = field(default_factory=_default_id)
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    prefix: str = DEFAULT_PREFIX
    mqtt_version: str = "auto"  # auto (5, falling back to 3.1.1) | 5 | 3.1.1
    usb_backend: str = "libusb"
    simulated_bus: str | None = None
    sysfs_root: str = "/sys"
    state_dir: str = "/var/lib/pantau-agent"
    poll_s: float = 2.0
    telemetry_s: float = 30.0
    kernel_log: str | None = None
    watch_kinds: tuple[str, ...] = ("camera", "speaker", "speakerphone", "microphone")
    watch_vidpid: tuple[str, ...] = ()
    meeting_processes: tuple[str, ...] = DEFAULT_MEETING_PROCESSES
    labels: dict[str, str] = field(default_factory=dict)
    spool_max_events: int = 100_000
    spool_max_bytes: int = 100 * 1024 * 1024
    spool_memory_max_events: int = 10_000  # held in memory while the disk refuses writes
    inflight_max: int = 1000
    recover_quiet_s: float = 600.0
    reconnect_max_s: float = 60.0
    # the idle self-test (docs/self-test.md)
    self_test: bool = True
    self_test_settle_s: float = 30.0  # after an attach (or the agent's start)
    self_test_daily_at: str = "03:00"  # local time; "off" for none
    self_test_min_interval_s: float = 600.0  # never more often than this per device
    self_test_retry_s: float = 300.0  # after the test let go of a device someone opened
    self_test_frames: int = 5
    self_test_first_frame_s: float = 5.0
    self_test_audio_s: float = 1.0

    @property
    def broker_url(self) -> Broker:
        return parse_broker(self.broker)

    def watches(self, dev: dict[str, Any]) -> bool:
        if self.watch_vidpid:
            return f"{dev['vid']}:{dev['pid']}" in self.watch_vidpid
        return dev.get("kind") in self.watch_kinds


# seconds: above 0, at most this (telemetry_s as the protocol's interval_s allows)
_FLOATS: dict[str, float] = {"poll_s": 3600.0, "telemetry_s": 604800.0, "recover_quiet_s": 7 * 86400.0,
                             "reconnect_max_s": 3600.0, "self_test_settle_s": 86400.0,
                             "self_test_min_interval_s": 30 * 86400.0, "self_test_retry_s": 86400.0,
                             "self_test_first_frame_s": 300.0, "self_test_audio_s": 300.0}
# whole numbers from 1 to this (inflight_max: MQTT has 65,535 packet ids)
_INTS: dict[str, int] = {"spool_max_events": 1_000_000_000, "spool_max_bytes": 2**50,
                         "spool_memory_max_events": 10_000_000, "inflight_max": 65535, "self_test_frames": 10_000}
_BOOLS = {"self_test"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_LISTS = {"watch_kinds", "watch_vidpid", "meeting_processes"}


def _coerce(name: str, value: Any, from_env: bool) -> Any:
    try:
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("must be true or false")
        if name in _FLOATS:
            top = _FLOATS[name]
            try:
                v = float(value) if not isinstance(value, bool) else float("nan")
            except (TypeError, ValueError):
                v = float("nan")
            if not 0 < v <= top:  # also refuses nan and infinity
                raise ValueError(f"must be a number of seconds above 0, at most {top:g}")
            return v
        if name in _INTS:
            most = _INTS[name]
            if isinstance(value, str) and value.strip().lstrip("+").isdigit():
                value = int(value)
            elif isinstance(value, float) and value.is_integer():
                value = int(value)  # 5.0 is a whole number; 2.7 is not
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"must be a whole number from 1 to {most}")
            return value
        if name in _LISTS:
            if not isinstance(value, str | list | tuple):
                raise ValueError("must be a list of strings (or one comma-separated string)")
            items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
            if not all(isinstance(s, str) for s in items):
                raise ValueError("must be a list of strings")
            return tuple(s for s in items if s)
        if name == "mqtt_version" and value == 5 and not isinstance(value, bool):
            return "5"  # mqtt_version = 5, a TOML number
        if name == "labels":
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("must look like unit=setjen,room=ruang-1")
                return {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError("must be a table of strings")
            return dict(value)
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value
    except (TypeError, ValueError) as exc:
        src = f"PANTAU_{name.upper()}" if from_env else name
        raise ConfigError(f"config: {src}: {value!r} {exc}") from None


def load(path: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> AgentConfig:
    env = dict(os.environ if env is None else env)
    names = {f.name for f in fields(AgentConfig)}
    values: dict[str, Any] = {}
    path = path or env.get("PANTAU_CONFIG")
    if path:
        for k, v in read_toml(path).items():
            if k not in names:
                raise ConfigError(f"config: {k}: unknown key (known: {', '.join(sorted(names))})")
            values[k] = _coerce(k, v, False)
    from_env: set[str] = set()
    for name in names:
        ev = env.get(f"PANTAU_{name.upper()}")
        if ev is not None and ev != "":
            values[name] = _coerce(name, ev, True)
            from_env.add(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    cfg = AgentConfig(**values)
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise name_the_source(exc, from_env - set(given)) from None
    return cfg


def _validate(cfg: AgentConfig) -> None:
    if not valid_agent_id(cfg.agent_id):
        raise ConfigError(f"config: agent_id: {cfg.agent_id!r} must be 1-64 characters of a-z 0-9 - _ .")
    parse_broker(cfg.broker)
    if cfg.mqtt_version not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"config: mqtt_version: {cfg.mqtt_version!r} must be auto, 5 or 3.1.1")
    if cfg.usb_backend not in ("libusb", "simulated"):
        raise ConfigError(f"config: usb_backend: {cfg.usb_backend!r} must be libusb or simulated")
    if cfg.usb_backend == "simulated" and not cfg.simulated_bus:
        raise ConfigError("config: simulated_bus: a path is needed when usb_backend is simulated")
    try:
        check_prefix(cfg.prefix)
    except ValueError as exc:
        raise ConfigError(f"config: prefix: {exc}") from None
    bad = [k for k in cfg.watch_kinds if k not in ("camera", "speaker", "speakerphone", "microphone", "other")]
    if bad:
        raise ConfigError(f"config: watch_kinds: unknown kind {bad[0]!r}")
    for vp in cfg.watch_vidpid:
        parts = vp.split(":")
        if len(parts) != 2 or not all(len(p) == 4 and all(c in "0123456789abcdef" for c in p) for p in parts):
            raise ConfigError(f"config: watch_vidpid: {vp!r} must look like 046d:0843 (lower-case hex)")
    if cfg.self_test_daily_at != "off":
        hh, _, mm = cfg.self_test_daily_at.partition(":")
        if not (len(hh) == len(mm) == 2 and hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
            raise ConfigError(f"config: self_test_daily_at: {cfg.self_test_daily_at!r} must be HH:MM (local time) "
                              f"or off")
    if cfg.self_test_frames < 2:
        raise ConfigError(f"config: self_test_frames: {cfg.self_test_frames} must be >= 2 (frozen needs a pair)")
    for name in ("ca_file", "cert_file", "key_file"):
        p = getattr(cfg, name)
        if p and not os.path.isfile(p):
            raise ConfigError(f"config: {name}: {p} does not exist")
