"""Reading captures: one MQTT message a line, as JSON records or ``mosquitto_sub -v`` output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class CaptureLine:
    line_no: int
    topic: str
    payload: bytes | dict[str, Any]
    received_at: str | None


class Unparseable(ValueError):
    """A capture line that is neither form."""


class _Repeated(ValueError):
    """An object in the line names a member twice."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Repeated
    return out


class _Members(list):
    """A JSON object read as its members in order, repeats kept."""


def _compact(v: Any) -> str:
    """JSON text of what ``_Members`` read: the payload as published, repeated members and all."""
    if isinstance(v, _Members):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_compact(x)}" for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_compact(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def _record(text: str) -> dict[str, Any] | None:
    """A JSON record line as a dict; its payload object as published text when it repeats a member (so the
    validator refuses it as it would the same payload in the other form)."""
    try:
        return json.loads(text, object_pairs_hook=_unique)
    except _Repeated:
        pass
    except (ValueError, RecursionError):  # not JSON, or nested too deep for the parser
        return None
    try:
        members = json.loads(text, object_pairs_hook=_Members)
        if not isinstance(members, _Members):
            return None
        rec = dict(members)
        if len(rec) != len(members):
            return None  # the record itself repeats a member: which topic or payload is meant?
        if isinstance(rec.get("payload"), _Members):
            rec["payload"] = _compact(rec["payload"])
        elif "payload" in rec:
            rec["payload"] = json.loads(_compact(rec["payload"]))
    except RecursionError:  # a repeated member, and nesting too deep further on
        return None
    return rec


def parse_line(line: str, line_no: int) -> CaptureLine | None:
    """One capture line -> CaptureLine; None for a blank line; Unparseable otherwise."""
    text = line.strip("\r\n")
    if line_no == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark, as some Windows editors save text
    if not text.strip():
        return None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        rec = _record(stripped)
        if isinstance(rec, dict) and "topic" in rec:
            topic = rec.get("topic")
            payload = rec.get("payload")
            received = rec.get("received_at")
            if not isinstance(topic, str) or "payload" not in rec:
                raise Unparseable(f"line {line_no}: a JSON record needs a string topic and a payload")
            if isinstance(payload, str):
                body: bytes | dict[str, Any] = payload.encode("utf-8", "surrogatepass")
            elif isinstance(payload, dict):
                body = payload
            else:
                body = json.dumps(payload).encode()  # rejected later as not an object
            return CaptureLine(line_no, topic, body, received if isinstance(received, str) else None)
        raise Unparseable(f"line {line_no}: not a capture record")
    topic, sep, rest = stripped.partition(" ")
    if not sep or not topic or "/" not in topic:
        raise Unparseable(f"line {line_no}: expected '<topic> <payload>'")
    return CaptureLine(line_no, topic, rest.encode("utf-8", "surrogatepass"), None)
