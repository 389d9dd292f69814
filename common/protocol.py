"""The Pantau wire protocol, version 1: topics, payloads and validation.

One definition shared by the agent (which builds messages) and the collector (which
validates them), so the two sides cannot drift apart. Validation raises only
:class:`ProtocolError`, whose ``reason`` is a short stable slug used for counters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_PREFIX = "pantau"
MAX_MESSAGE_CHARS = 512

AGENT_ID_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?Z$")

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
    }
)
# Event types that must carry a device object with a string key.
DEVICE_EVENT_TYPES = frozenset(
    {"device.attached", "device.detached", "device.error", "device.recovered", "device.usage", "handling.reported"}
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
    "os.problem": "device",
    "device.self_reported": "device",
}
ERROR_SOURCES = frozenset({"kernel", "pnp", "probe", "device"})
DEVICE_KINDS = ("camera", "speakerphone", "speaker", "microphone", "other")
SPEEDS = ("low", "full", "high", "super", "super_plus", "unknown")
SPEED_RANK = {s: i for i, s in enumerate(SPEEDS[:-1])}


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


@dataclass(slots=True)
class Message:
    """A validated message. ``ts`` and ``seq`` are None only for a will."""

    topic: Topic
    payload: dict[str, Any]

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


def check_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "/+#\0"):
        raise ValueError(f"invalid topic prefix {prefix!r}: must be one topic level")
    return prefix


def parse_topic(topic: str, prefix: str | None = None) -> Topic:
    parts = topic.split("/")
    if len(parts) != 5 or parts[2] != "agents":
        raise ProtocolError("bad_topic", f"topic {topic[:120]!r} is not <prefix>/v1/agents/<agent_id>/<channel>")
    pfx, ver, _, agent, channel = parts
    if prefix is not None and pfx != prefix:
        raise ProtocolError("bad_topic", f"topic prefix {pfx!r} is not {prefix!r}")
    if not pfx:
        raise ProtocolError("bad_topic", "empty topic prefix")
    if ver != f"v{VERSION}":
        raise ProtocolError("bad_version", f"topic version {ver!r} is not v{VERSION}")
    if not valid_agent_id(agent):
        raise ProtocolError("bad_topic", f"agent id {agent[:80]!r} in topic is invalid")
    if channel not in KIND_OF_CHANNEL:
        raise ProtocolError("bad_topic", f"unknown channel {channel[:40]!r}")
    return Topic(pfx, agent, channel)


# ---------------------------------------------------------------- encoding


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; refuses to produce a payload the collector would reject."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"payload is {len(data)} bytes, limit {MAX_PAYLOAD_BYTES}")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(raw: bytes | str) -> Any:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"payload is {len(raw)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"payload is not UTF-8 JSON: {str(exc)[:120]}") from None


# ---------------------------------------------------------------- validation


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool)


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


def check_device(dev: object, where: str) -> dict[str, Any]:
    if not isinstance(dev, dict):
        raise ProtocolError("bad_device", f"{where} must be an object")
    if not isinstance(dev.get("key"), str) or not dev["key"]:
        raise ProtocolError("bad_device", f"{where}.key must be a non-empty string")
    return dev


def _check_error(err: object, etype: str) -> None:
    if not isinstance(err, dict):
        raise ProtocolError("bad_type" if err is not None else "missing_member", "error must be an object")
    code = err.get("code")
    if not isinstance(code, str):
        raise ProtocolError("missing_member" if "code" not in err else "bad_type", "error.code must be a string")
    if code not in ERROR_CODES:
        raise ProtocolError("unknown_code", f"unknown error code {code[:60]!r}")
    if etype == "device.error":
        src = err.get("source")
        if src is not None and src not in ERROR_SOURCES:
            raise ProtocolError("bad_type", f"error.source {str(src)[:30]!r} is not one of {sorted(ERROR_SOURCES)}")
        for name in ("errno", "problem_code"):
            if err.get(name) is not None and not _is_int(err[name]):
                raise ProtocolError("bad_type", f"error.{name} must be an integer or null")
        if "count" in err and not (_is_int(err["count"]) and err["count"] >= 1):
            raise ProtocolError("bad_type", "error.count must be an integer >= 1")
        if "message" in err and err["message"] is not None and not isinstance(err["message"], str):
            raise ProtocolError("bad_type", "error.message must be a string")


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
    if ctx:
        if "in_use" in ctx and ctx["in_use"] is not None and not isinstance(ctx["in_use"], bool):
            raise ProtocolError("bad_type", "context.in_use must be a boolean")
        if "users" in ctx and ctx["users"] is not None and not (
            isinstance(ctx["users"], list) and all(isinstance(u, str) for u in ctx["users"])
        ):
            raise ProtocolError("bad_type", "context.users must be an array of strings")
        if "meeting" in ctx and ctx["meeting"] is not None and not isinstance(ctx["meeting"], bool):
            raise ProtocolError("bad_type", "context.meeting must be a boolean")


def _check_devices_list(p: dict[str, Any], kind: str) -> None:
    devices = _require(p, "devices", list)
    for i, d in enumerate(devices):
        check_device(d, f"devices[{i}]")
        if kind == "telemetry" and "present" in d and not isinstance(d["present"], bool):
            raise ProtocolError("bad_type", f"devices[{i}].present must be a boolean")


def _check_state(p: dict[str, Any]) -> None:
    state = _require(p, "state", str)
    if state not in ("online", "offline"):
        raise ProtocolError("bad_type", f"state {state[:30]!r} is not online or offline")
    if state == "offline" and "reason" in p and p["reason"] not in ("lost", "shutdown"):
        raise ProtocolError("bad_type", "offline reason must be lost or shutdown")
    if "labels" in p and not isinstance(p["labels"], dict):
        raise ProtocolError("bad_type", "labels must be an object")


def validate_payload(p: object, topic: Topic | None = None) -> dict[str, Any]:
    """Check a decoded payload against the envelope and its kind's schema."""
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
        if not isinstance(p["ts"], str):
            raise ProtocolError("bad_ts", "ts must be a string")
        ts_seconds(p["ts"])
        if "seq" not in p:
            raise ProtocolError("missing_member", "seq is missing")
        seq = p["seq"]
        if not _is_int(seq) or seq < 0:
            raise ProtocolError("bad_seq", "seq must be an integer >= 0")
    if kind == "event":
        _check_event(p)
    elif kind == "inventory":
        _check_devices_list(p, kind)
    elif kind == "telemetry":
        if "host" in p and not isinstance(p["host"], dict):
            raise ProtocolError("bad_type", "host must be an object")
        _check_devices_list(p, kind)
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
        return Message(t, validate_payload(payload, t))
    except ProtocolError:
        raise
    except Exception as exc:  # defensive: validation must never raise anything else
        raise ProtocolError("malformed", f"{type(exc).__name__}: {str(exc)[:120]}") from None


def encode_unchecked(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"payload cannot be encoded: {str(exc)[:120]}") from None


# ---------------------------------------------------------------- builders


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
