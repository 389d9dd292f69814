"""The Pantau wire protocol, version 1: topics, payloads and validation.

One definition shared by the agent (which builds messages) and the collector (which
validates them), so the two sides cannot drift apart. Validation raises only
:class:`ProtocolError`, whose ``reason`` is a short stable slug used for counters.

What validation lets through can always be stored and written out again: every string is
Unicode text (no lone surrogates), every number is finite, every integer fits SQLite's signed
64 bits, no object repeats a member, and the members the collector reads are of their type,
within their enum or within their bounds (docs/protocol.md, "Validation", lists them all).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Required, TypedDict, cast

VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_PREFIX = "pantau"
MAX_KEY_CHARS = 256  # a device key (vid:pid:serial or vid:pid@port)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
DASHBOARD_BOOT_PREFIX = "dashboard-"  # the boot of a handling report made at the dashboard
MAX_MESSAGE_CHARS = 512

# Every JSON integer anywhere in a payload must fit SQLite's INTEGER (signed 64 bits).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# Years a message's ts may carry. From the Unix epoch: a PC whose CMOS battery died and that reset
# its clock to 1970 or 2000 still reports, judged on its own clock; year 1 or 9999 is no clock at all.
TS_YEAR_MIN = 1970
TS_YEAR_MAX = 2100

# \Z, not $: "$" also matches before a trailing newline. [0-9], not \d: \d matches any Unicode digit.
AGENT_ID_RE = re.compile(r"^[a-z0-9_.-]{1,64}\Z")
_TS_RE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?Z\Z")

KINDS = ("state", "inventory", "telemetry", "event")
CHANNEL_OF_KIND = {"state": "state", "inventory": "inventory", "telemetry": "telemetry", "event": "events"}
KIND_OF_CHANNEL = {v: k for k, v in CHANNEL_OF_KIND.items()}
QOS_OF_CHANNEL = {"state": 1, "inventory": 1, "telemetry": 0, "events": 1}
RETAINED_CHANNELS = frozenset({"state", "inventory"})

EVENT_TYPES = frozenset(
    {
        "agent.started",
        "agent.stopping",
        "host.suspending",
        "host.resumed",
        "device.attached",
        "device.detached",
        "device.error",
        "device.recovered",
        "device.usage",
        "handling.reported",
        "device.self_test",
    }
)
# Event types that must carry a device object with a string key.
DEVICE_EVENT_TYPES = frozenset(
    {"device.attached", "device.detached", "device.error", "device.recovered", "device.usage", "handling.reported",
     "device.self_test"}
)

# Error code -> family ("link", "device" or "info"), as in PROTOCOL.md.
ERROR_CODES: dict[str, str] = {
    "usb.enumeration_failed": "link",
    "usb.protocol_error": "link",
    "usb.over_current": "link",
    "usb.speed_degraded": "link",
    "usb.reset": "info",
    "usb.timeout": "device",
    "video.stream_error": "device",
    "video.control_error": "device",
    "audio.stream_error": "device",
    "video.no_frames": "device",
    "video.frozen": "device",
    "audio.no_signal": "device",
    "os.problem": "device",
    "device.self_reported": "device",
}
ERROR_SOURCES = frozenset({"kernel", "pnp", "probe", "device"})
DEVICE_KINDS = ("camera", "speakerphone", "speaker", "microphone", "other")
SPEEDS = ("low", "full", "high", "super", "super_plus", "unknown")
SPEED_RANK = {s: i for i, s in enumerate(SPEEDS[:-1])}
STATES = ("online", "offline")
OFFLINE_REASONS = ("lost", "shutdown")
REPORT_VIA = ("agent", "dashboard")

# Bounds of the numbers the collector reads, (low, high) inclusive; null means "not known".
HOST_BOUNDS: dict[str, tuple[float, float]] = {
    "cpu_pct": (0, 100),
    "mem_pct": (0, 100),
    "disk_pct": (0, 100),
    "uptime_s": (0, 100 * 366 * 86400),  # a century
    "temp_c": (-50, 150),
}
INTERVAL_S_MAX = 7 * 86400
ERRNO_BOUNDS = (-(2**31), 2**31 - 1)  # a C int
PROBLEM_CODE_BOUNDS = (0, 2**32 - 1)  # a Windows ULONG
# Device members that are text (or null, meaning unknown).
DEVICE_TEXT_MEMBERS = ("vid", "pid", "serial", "vendor", "product", "port", "firmware")

# The reasons validation gives, one per class of fault (docs/protocol.md lists what each covers).
REASONS = (
    "too_large", "bad_json", "bad_unicode", "duplicate_key", "non_finite", "number_out_of_range", "not_object",
    "missing_member", "bad_type", "bad_enum", "bad_version", "bad_agent", "agent_mismatch", "bad_boot", "bad_seq",
    "bad_ts", "ts_out_of_range", "unknown_kind", "kind_mismatch", "unknown_type", "unknown_code", "bad_device",
    "bad_topic", "malformed",
)


class ProtocolError(ValueError):
    """A message that breaks the protocol. ``reason`` is a stable slug for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Topic:
    prefix: str
    agent: str
    channel: str

    def __str__(self) -> str:
        return f"{self.prefix}/v{VERSION}/agents/{self.agent}/{self.channel}"


class DeviceObject(TypedDict, total=False):
    """A device as the wire carries it (PROTOCOL.md "Device object"; telemetry adds the gauges)."""

    key: Required[str]
    vid: str | None
    pid: str | None
    serial: str | None
    kind: str | None
    vendor: str | None
    product: str | None
    port: str | None
    speed: str | None
    max_speed: str | None
    firmware: str | None
    present: bool | None
    in_use: Any  # a non-boolean reads as false
    errors_total: int | None
    resets_total: int | None


class ErrorObject(TypedDict, total=False):
    code: Required[str]
    source: str | None
    errno: int | None
    problem_code: int | None
    message: str | None
    count: int | None


class HostGauges(TypedDict, total=False):
    cpu_pct: float | None
    mem_pct: float | None
    disk_pct: float | None
    uptime_s: float | None
    temp_c: float | None


class Payload(TypedDict, total=False):
    """A validated payload: the envelope, and the members of its kind that validation checked."""

    v: Required[int]
    agent: Required[str]
    boot: Required[str]
    kind: Required[str]
    seq: int  # absent only in a will
    ts: str  # absent only in a will
    type: str  # event
    device: DeviceObject  # device events
    error: ErrorObject  # device.error, device.recovered
    context: dict[str, Any]  # event (free-form; known members validated)
    devices: list[DeviceObject]  # inventory, telemetry
    host: HostGauges  # telemetry
    spool: dict[str, int]  # telemetry
    state: str  # state
    reason: str | None  # state offline
    labels: dict[str, str]  # state online
    hostname: str | None
    version: str | None
    platform: str | None
    interval_s: float | None
    spool_dropped: int | None


@dataclass(slots=True)
class Message:
    """A validated message. ``ts`` and ``seq`` are None only for a will."""

    topic: Topic
    payload: Payload

    @property
    def agent(self) -> str:
        return self.payload["agent"]

    @property
    def boot(self) -> str:
        return self.payload["boot"]

    @property
    def seq(self) -> int | None:
        return self.payload.get("seq")

    @property
    def ts(self) -> str | None:
        return self.payload.get("ts")

    @property
    def kind(self) -> str:
        return self.payload["kind"]

    @property
    def key(self) -> tuple[str, str, int] | None:
        """The dedup identity ``(agent, boot, seq)``; None for messages without seq."""
        seq = self.seq
        return None if seq is None else (self.agent, self.boot, seq)


# ---------------------------------------------------------------- time


def format_ts(dt: datetime) -> str:
    """RFC 3339 UTC with milliseconds, as the wire wants it."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def format_epoch(t: float) -> str:
    """RFC 3339 UTC with milliseconds for seconds since the epoch."""
    return format_ts(datetime.fromtimestamp(t, UTC))


def now_ts() -> str:
    return format_ts(datetime.now(UTC))


def parse_ts(value: object) -> datetime:
    """Parse a wire timestamp; ProtocolError("bad_ts") unless RFC 3339 UTC with Z."""
    if not isinstance(value, str):
        raise ProtocolError("bad_ts", "ts must be a string")
    m = _TS_RE.match(value)
    if not m:
        raise ProtocolError("bad_ts", f"ts {value[:40]!r} is not RFC 3339 UTC with Z")
    return datetime.fromtimestamp(_epoch(value, m), UTC)


def _epoch(value: str, m: re.Match[str]) -> float:
    frac = m.group(7) or ""
    micro = int((frac[1:] + "000000")[:6]) if frac else 0
    try:
        y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
        return datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp() + micro / 1e6
    except ValueError as exc:
        raise ProtocolError("bad_ts", f"ts {value[:40]!r}: {exc}") from None


@lru_cache(maxsize=8192)
def ts_seconds(value: str) -> float:
    """Seconds since the epoch of a wire timestamp; ProtocolError("bad_ts") if it is not one.

    Cached: a message's ts is read by validation, ordering, the clock and the store."""
    if not isinstance(value, str):
        raise ProtocolError("bad_ts", "ts must be a string")
    m = _TS_RE.match(value)
    if not m:
        raise ProtocolError("bad_ts", f"ts {value[:40]!r} is not RFC 3339 UTC with Z")
    return _epoch(value, m)


def ts_seconds_or_none(value: str | None) -> float | None:
    """:func:`ts_seconds` for stored values that may be missing or malformed: None then."""
    if not value:
        return None
    try:
        return ts_seconds(value)
    except ProtocolError:
        return None


def check_ts(value: object, where: str = "ts") -> float:
    """A wire timestamp as validation wants it: the format of :func:`ts_seconds` ("bad_ts") and a
    year within TS_YEAR_MIN..TS_YEAR_MAX ("ts_out_of_range"). Returns seconds since the epoch."""
    if not isinstance(value, str):
        raise ProtocolError("bad_ts", f"{where} must be a string")
    try:
        t = ts_seconds(value)
    except ProtocolError as exc:
        raise ProtocolError("bad_ts", f"{where}: {exc.detail}") from None
    if not TS_YEAR_MIN <= int(value[:4]) <= TS_YEAR_MAX:  # the format guarantees four ASCII digits
        raise ProtocolError("ts_out_of_range", f"{where} {value[:40]!r} is not within the years "
                                               f"{TS_YEAR_MIN}-{TS_YEAR_MAX}")
    return t


# ---------------------------------------------------------------- topics


def valid_agent_id(agent_id: object) -> bool:
    return isinstance(agent_id, str) and AGENT_ID_RE.match(agent_id) is not None


def topic_for(agent_id: str, channel: str, prefix: str = DEFAULT_PREFIX) -> str:
    if channel not in KIND_OF_CHANNEL:
        raise ValueError(f"unknown channel {channel!r}")
    if not valid_agent_id(agent_id):
        raise ValueError(f"invalid agent_id {agent_id!r}: 1-64 characters of a-z 0-9 - _ .")
    check_prefix(prefix)
    return f"{prefix}/v{VERSION}/agents/{agent_id}/{channel}"


def subscription_for(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/v{VERSION}/agents/+/+"


def _bad_prefix(prefix: str) -> bool:
    return not prefix or any(c in prefix for c in "/+#\0") or not _encodable(prefix)


def check_prefix(prefix: str) -> str:
    if _bad_prefix(prefix):
        raise ValueError(f"invalid topic prefix {prefix!r}: must be one topic level")
    return prefix


@lru_cache(maxsize=4096)
def parse_topic(topic: str, prefix: str | None = None) -> Topic:
    """``<prefix>/v1/agents/<agent_id>/<channel>`` -> Topic. Cached: a collector sees few topics."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[2] != "agents":
        raise ProtocolError("bad_topic", f"topic {topic[:120]!r} is not <prefix>/v1/agents/<agent_id>/<channel>")
    pfx, ver, _, agent, channel = parts
    if prefix is not None and pfx != prefix:
        raise ProtocolError("bad_topic", f"topic prefix {pfx[:60]!r} is not {prefix!r}")
    if _bad_prefix(pfx):
        raise ProtocolError("bad_topic", f"topic prefix {pfx[:60]!r} is not one topic level of text")
    if ver != f"v{VERSION}":
        raise ProtocolError("bad_version", f"topic version {ver[:20]!r} is not v{VERSION}")
    if not valid_agent_id(agent):
        raise ProtocolError("bad_topic", f"agent id {agent[:80]!r} in topic is invalid")
    if channel not in KIND_OF_CHANNEL:
        raise ProtocolError("bad_topic", f"unknown channel {channel[:40]!r}")
    return Topic(pfx, agent, channel)


# ---------------------------------------------------------------- JSON


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps_strict(obj: Any) -> str:
    """Compact JSON text that any strict reader accepts: ValueError on NaN or an infinity and on a
    string that is not Unicode text (a lone surrogate), TypeError on what JSON has no form for."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    return text


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON as an agent publishes it; ProtocolError("too_large") over the size limit.
    It checks nothing else: the collector's validation is :func:`decode_message`."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"payload is {len(data)} bytes, limit {MAX_PAYLOAD_BYTES}")
    return data


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ProtocolError("duplicate_key", f"member {name[:60]!r} appears twice in one object")
            seen.add(name)
    return obj


def _int(literal: str) -> int:
    # 20 characters hold every int64 (with its sign); longer is out of range without converting it
    if len(literal) <= 20:
        value = int(literal)
        if INT64_MIN <= value <= INT64_MAX:
            return value
    raise ProtocolError("number_out_of_range", f"integer {literal[:30]}{'...' if len(literal) > 30 else ''} "
                                               "does not fit 64 bits")


def _float(literal: str) -> float:
    value = float(literal)
    if math.isfinite(value):
        return value
    raise ProtocolError("non_finite", f"number {literal[:30]}{'...' if len(literal) > 30 else ''} is not finite")


def _constant(name: str) -> Any:
    raise ProtocolError("non_finite", f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def decode_json(raw: bytes | str) -> Any:
    """Strict JSON of at most MAX_PAYLOAD_BYTES UTF-8 bytes: no duplicate members, no NaN or
    infinities, integers within 64 bits, no lone surrogates. Raises only ProtocolError."""
    if isinstance(raw, str):
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError("bad_unicode", "payload text holds a lone surrogate: not Unicode") from None
    else:
        size = len(raw)
    if size > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"payload is {size} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
        value = _DECODER.decode(text)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"payload is not UTF-8 JSON: {str(exc)[:120]}") from None
    # Only a \uD800-\uDFFF escape can make a surrogate (UTF-8 input cannot); a valid pair decodes to
    # one character, so whatever survives is a lone one. Check only when such an escape is there.
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("bad_unicode", "a string holds a lone surrogate (\\ud800-\\udfff): "
                                               "not Unicode") from None
        except RecursionError:
            raise ProtocolError("bad_json", "payload is nested too deeply") from None
    return value


def encode_unchecked(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("bad_unicode", "a string holds a lone surrogate (\\ud800-\\udfff): not Unicode") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"payload cannot be encoded: {str(exc)[:120]}") from None


# ---------------------------------------------------------------- validation


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(p: dict[str, Any], name: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if name not in p:
        raise ProtocolError("missing_member", f"{where}{name} is missing")
    v = p[name]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError("bad_type", f"{where}{name} must be {_tname(types)}")
    if not isinstance(v, types):
        raise ProtocolError("bad_type", f"{where}{name} must be {_tname(types)}")
    return v


def _tname(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
             bool: "a boolean"}
    return " or ".join(names.get(t, t.__name__) for t in ts)


def _enum(obj: dict[str, Any], name: str, allowed: tuple[str, ...] | frozenset[str], where: str,
          nullable: bool = False) -> None:
    """``obj[name]``, when present, is one of ``allowed`` (or null, if ``nullable``)."""
    if name not in obj:
        return
    v = obj[name]
    if v is None and nullable:
        return
    if not isinstance(v, str) or v not in allowed:
        shown = repr(v)[:40] if isinstance(v, str) else type(v).__name__
        raise ProtocolError("bad_enum", f"{where}{name} {shown} is not one of {', '.join(sorted(allowed))}")


def _number(obj: dict[str, Any], name: str, lo: float, hi: float, where: str, integer: bool = False) -> None:
    """``obj[name]``, when present and not null, is a number (an integer if ``integer``) in lo..hi."""
    v = obj.get(name)
    if v is None:
        return
    if v.__class__ is bool or not isinstance(v, int if integer else (int, float)):
        raise ProtocolError("bad_type", f"{where}{name} must be {'an integer' if integer else 'a number'} or null")
    if not lo <= v <= hi:
        raise ProtocolError("number_out_of_range", f"{where}{name} {v!r} is not within {lo}..{hi}")


def _text(obj: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    """Each of ``names``, when present, is a string or null."""
    for name in names:
        v = obj.get(name)
        if v is not None and not isinstance(v, str):
            raise ProtocolError("bad_type", f"{where}{name} must be a string or null")


def _boolean(obj: dict[str, Any], names: tuple[str, ...], where: str, nullable: bool) -> None:
    for name in names:
        if name in obj and not isinstance(obj[name], bool) and not (nullable and obj[name] is None):
            raise ProtocolError("bad_type", f"{where}{name} must be a boolean")


# The member rules below are written twice: once as readable checks that raise the precise
# reason (_explain_*), once as a table of cheap predicates that run first on every message
# (_FAST_*). A predicate may only be stricter than its check (it tests exact JSON types), so
# when a table says no, the checks decide; tests hold the two together.


def _explain_device(dev: dict[str, Any], where: str) -> None:
    w = where + "."
    _enum(dev, "kind", DEVICE_KINDS, w, nullable=True)  # null reads as absent
    _enum(dev, "speed", SPEEDS, w, nullable=True)
    _enum(dev, "max_speed", SPEEDS, w, nullable=True)
    _text(dev, DEVICE_TEXT_MEMBERS, w)
    _boolean(dev, ("present",), w, nullable=True)
    _number(dev, "errors_total", 0, INT64_MAX, w, integer=True)
    _number(dev, "resets_total", 0, INT64_MAX, w, integer=True)


def _explain_host(host: dict[str, Any]) -> None:
    for name, (lo, hi) in HOST_BOUNDS.items():
        _number(host, name, lo, hi, "host.")


def _explain_context(ctx: dict[str, Any]) -> None:
    # PROTOCOL.md: a missing or non-boolean in_use reads as false (and so does meeting): not checked
    users = ctx.get("users")
    if users is not None and not (isinstance(users, list) and all(isinstance(u, str) for u in users)):
        raise ProtocolError("bad_type", "context.users must be an array of strings")
    if ctx.get("host_boot") is not None:  # informational: its format only (no rule reads it)
        try:
            ts_seconds(ctx["host_boot"])
        except ProtocolError as exc:
            raise ProtocolError("bad_ts", f"context.host_boot: {exc.detail}") from None
    _text(ctx, ("prev_boot", "note", "reported_by", "version"), "context.")
    _enum(ctx, "via", REPORT_VIA, "context.", nullable=True)


def _explain_error(err: dict[str, Any]) -> None:
    _enum(err, "source", ERROR_SOURCES, "error.", nullable=True)
    _number(err, "errno", *ERRNO_BOUNDS, "error.", integer=True)
    _number(err, "problem_code", *PROBLEM_CODE_BOUNDS, "error.", integer=True)
    if "count" in err and not (_is_int(err["count"]) and 1 <= err["count"] <= INT64_MAX):
        raise ProtocolError("bad_type", "error.count must be an integer >= 1")
    _text(err, ("message",), "error.")


def _one_of(allowed: tuple[str, ...] | frozenset[str], nullable: bool = False) -> Callable[[Any], bool]:
    values = frozenset(allowed)
    if nullable:
        return lambda v: v is None or (v.__class__ is str and v in values)
    return lambda v: v.__class__ is str and v in values


def _within(lo: float, hi: float, integer: bool = False) -> Callable[[Any], bool]:
    if integer:
        return lambda v: v is None or (v.__class__ is int and lo <= v <= hi)
    return lambda v: v is None or ((v.__class__ is float or v.__class__ is int) and lo <= v <= hi)


def _text_or_null(v: Any) -> bool:
    return v is None or v.__class__ is str


def _bool_or_null(v: Any) -> bool:
    return v is None or v.__class__ is bool


_FAST_DEVICE: dict[str, Callable[[Any], bool]] = {
    "kind": _one_of(DEVICE_KINDS, nullable=True),
    "speed": _one_of(SPEEDS, nullable=True),
    "max_speed": _one_of(SPEEDS, nullable=True),
    **dict.fromkeys(DEVICE_TEXT_MEMBERS, _text_or_null),
    "present": _bool_or_null,
    "errors_total": _within(0, INT64_MAX, integer=True),
    "resets_total": _within(0, INT64_MAX, integer=True),
}
_FAST_HOST = {name: _within(lo, hi) for name, (lo, hi) in HOST_BOUNDS.items()}
_FAST_CONTEXT: dict[str, Callable[[Any], bool]] = {
    "in_use": lambda v: True,  # a non-boolean reads as false
    "meeting": lambda v: True,
    "users": lambda v: v is None or (v.__class__ is list and all(u.__class__ is str for u in v)),
    "host_boot": lambda v: False,  # a timestamp: always through check_ts
    **dict.fromkeys(("prev_boot", "note", "reported_by", "version"), _text_or_null),
    "via": _one_of(REPORT_VIA, nullable=True),
}
_FAST_ERROR: dict[str, Callable[[Any], bool]] = {
    "source": _one_of(ERROR_SOURCES, nullable=True),
    "errno": _within(*ERRNO_BOUNDS, integer=True),
    "problem_code": _within(*PROBLEM_CODE_BOUNDS, integer=True),
    "count": lambda v: v.__class__ is int and 1 <= v <= INT64_MAX,
    "message": _text_or_null,
}


def _fast_ok(obj: dict[str, Any], rules: dict[str, Callable[[Any], bool]]) -> bool:
    for name, v in obj.items():
        ok = rules.get(name)
        if ok is not None and not ok(v):
            return False
    return True


def check_device(dev: object, where: str) -> dict[str, Any]:
    if not isinstance(dev, dict):
        raise ProtocolError("bad_device", f"{where} must be an object")
    key = dev.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or _CONTROL_CHARS.search(key):
        raise ProtocolError("bad_device", f"{where}.key must be a string of 1-{MAX_KEY_CHARS} characters "
                                          "without control characters")
    if not _fast_ok(dev, _FAST_DEVICE):
        _explain_device(dev, where)
    return dev


def _check_error(err: object, etype: str) -> None:
    if not isinstance(err, dict):
        raise ProtocolError("bad_type" if err is not None else "missing_member", "error must be an object")
    code = err.get("code")
    if not isinstance(code, str):
        raise ProtocolError("missing_member" if "code" not in err else "bad_type", "error.code must be a string")
    if code not in ERROR_CODES:
        raise ProtocolError("unknown_code", f"unknown error code {code[:60]!r}")
    if not _fast_ok(err, _FAST_ERROR):
        _explain_error(err)


def _check_event(p: dict[str, Any]) -> None:
    etype = _require(p, "type", str)
    if etype not in EVENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown event type {etype[:60]!r}")
    ctx = p.get("context", {})
    if ctx is not None and not isinstance(ctx, dict):
        raise ProtocolError("bad_type", "context must be an object")
    if etype in DEVICE_EVENT_TYPES:
        if "device" not in p:
            raise ProtocolError("bad_device", f"{etype} needs a device object")
        check_device(p["device"], "device")
    elif "device" in p and p["device"] is not None:
        check_device(p["device"], "device")
    if etype in ("device.error", "device.recovered"):
        if "error" not in p:
            raise ProtocolError("missing_member", f"{etype} needs error")
        _check_error(p["error"], etype)
    elif p.get("error") is not None:
        _check_error(p["error"], etype)
    if ctx and not _fast_ok(ctx, _FAST_CONTEXT):
        _explain_context(ctx)


def _check_devices_list(p: dict[str, Any]) -> None:
    devices = _require(p, "devices", list)
    for d in devices:  # the common case without building a name for each device
        if d.__class__ is not dict or not _fast_ok(d, _FAST_DEVICE):
            break
        key = d.get("key")
        if key.__class__ is not str or not key or len(key) > MAX_KEY_CHARS or _CONTROL_CHARS.search(key):
            break
    else:
        return
    for i, d in enumerate(devices):
        check_device(d, f"devices[{i}]")


def _check_telemetry(p: dict[str, Any]) -> None:
    host = p.get("host")
    if host is not None:
        if not isinstance(host, dict):
            raise ProtocolError("bad_type", "host must be an object")
        if not _fast_ok(host, _FAST_HOST):
            _explain_host(host)
    spool = p.get("spool")
    if spool is not None:
        if not isinstance(spool, dict):
            raise ProtocolError("bad_type", "spool must be an object")
        _number(spool, "depth", 0, INT64_MAX, "spool.", integer=True)
        _number(spool, "dropped_total", 0, INT64_MAX, "spool.", integer=True)
    _check_devices_list(p)


def _check_state(p: dict[str, Any]) -> None:
    state = _require(p, "state", str)
    if state not in STATES:
        raise ProtocolError("bad_enum", f"state {state[:30]!r} is not online or offline")
    if state == "offline":
        _enum(p, "reason", OFFLINE_REASONS, "offline ")
    if "labels" in p and not isinstance(p["labels"], dict):
        raise ProtocolError("bad_type", "labels must be an object")
    _text(p, ("version", "platform", "hostname"), "")
    v = p.get("interval_s")
    if v is not None:
        _number(p, "interval_s", 0, INTERVAL_S_MAX, "")
        if v <= 0:
            raise ProtocolError("number_out_of_range", f"interval_s {v!r} must be above 0")
    _number(p, "spool_dropped", 0, INT64_MAX, "", integer=True)


def validate_payload(p: object, topic: Topic | None = None) -> dict[str, Any]:
    """Check a decoded payload against the envelope and its kind's schema. The rules on every
    value (Unicode text, finite numbers, 64-bit integers, no duplicate members) are decode_json's:
    use :func:`decode_message` for the whole check."""
    if not isinstance(p, dict):
        raise ProtocolError("not_object", "payload must be a JSON object")
    v = _require(p, "v", int)
    if v != VERSION:
        raise ProtocolError("bad_version", f"v is {v}, this collector speaks {VERSION}")
    agent = _require(p, "agent", str)
    if not valid_agent_id(agent):
        raise ProtocolError("bad_agent", f"agent {agent[:80]!r} is not a valid agent id")
    if topic is not None and agent != topic.agent:
        raise ProtocolError("agent_mismatch", f"payload agent {agent!r} differs from topic agent {topic.agent!r}")
    boot = _require(p, "boot", str)
    if not 8 <= len(boot) <= 64:
        raise ProtocolError("bad_boot", "boot must be 8-64 characters")
    kind = _require(p, "kind", str)
    if kind not in KINDS:
        raise ProtocolError("unknown_kind", f"unknown kind {kind[:40]!r}")
    if topic is not None and KIND_OF_CHANNEL[topic.channel] != kind:
        raise ProtocolError("kind_mismatch", f"kind {kind!r} does not match channel {topic.channel!r}")
    is_will = kind == "state" and p.get("state") == "offline" and "seq" not in p and "ts" not in p
    if not is_will:
        if "ts" not in p:
            raise ProtocolError("missing_member", "ts is missing")
        check_ts(p["ts"])
        if "seq" not in p:
            raise ProtocolError("missing_member", "seq is missing")
        seq = p["seq"]
        if not _is_int(seq) or seq < 0:
            raise ProtocolError("bad_seq", "seq must be an integer >= 0")
        if seq > INT64_MAX:  # decode_json already refuses it; a dict given here directly may not have been
            raise ProtocolError("number_out_of_range", f"seq {seq} does not fit 64 bits")
    if boot.startswith(DASHBOARD_BOOT_PREFIX) and (kind != "event" or p.get("type") != "handling.reported"
                                                   or p.get("seq") != 1):
        # a dashboard report is its own boot, `dashboard-<hex>`, seq 1; nothing else may borrow that form,
        # since such a boot is no boot for the policy (it ends nothing and is placed by its ts)
        raise ProtocolError("bad_boot", "a boot named dashboard-… carries only a handling.reported with seq 1")
    if kind == "event":
        _check_event(p)
    elif kind == "inventory":
        _check_devices_list(p)
    elif kind == "telemetry":
        _check_telemetry(p)
    else:
        _check_state(p)
    return p


def decode_message(topic: str, raw: bytes | str | dict[str, Any], prefix: str | None = None) -> Message:
    """Validate one MQTT message. Raises ProtocolError, and nothing else, on bad input."""
    try:
        t = parse_topic(topic, prefix) if isinstance(topic, str) else None
        if t is None:
            raise ProtocolError("bad_topic", "topic must be a string")
        if isinstance(raw, dict):
            payload = decode_json(encode_unchecked(raw))
        elif isinstance(raw, bytes | bytearray | memoryview | str):
            payload = decode_json(bytes(raw) if not isinstance(raw, str) else raw)
        else:
            raise ProtocolError("bad_json", "payload must be bytes, text or an object")
        return Message(t, cast(Payload, validate_payload(payload, t)))  # validated: of the Payload shape
    except ProtocolError:
        raise
    except Exception as exc:  # defensive: validation must never raise anything else
        raise ProtocolError("malformed", f"{type(exc).__name__}: {str(exc)[:120]}") from None


# ---------------------------------------------------------------- builders


def clean_text(s: object) -> str | None:
    """A string a device reports (serial, vendor, product), without control characters (cheap devices pad
    serials with NULs) and surrounding blanks; None when nothing is left."""
    if not isinstance(s, str):
        return None
    s = _CONTROL_CHARS.sub("", s).strip()
    return s or None


def device_key(vid: str, pid: str, serial: str | None, port: str) -> str:
    """``vid:pid:serial``, or ``vid:pid@port`` without a readable serial."""
    if serial and serial.strip():
        return f"{vid}:{pid}:{serial.strip()}"
    return f"{vid}:{pid}@{port}"


def envelope(agent: str, boot: str, seq: int, kind: str, ts: str | None = None, **body: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": VERSION, "agent": agent, "boot": boot, "seq": seq, "ts": ts or now_ts(), "kind": kind}
    msg.update(body)
    return msg


def will_payload(agent: str, boot: str) -> dict[str, Any]:
    return {"v": VERSION, "agent": agent, "boot": boot, "kind": "state", "state": "offline", "reason": "lost"}


def truncate_message(line: str) -> str:
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"
