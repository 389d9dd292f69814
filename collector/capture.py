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


def parse_line(line: str, line_no: int) -> CaptureLine | None:
    """One capture line -> CaptureLine; None for a blank line; Unparseable otherwise."""
    text = line.strip("\r\n")
    if not text.strip():
        return None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            rec = json.loads(stripped)
        except ValueError:
            rec = None
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
    topic, sep, rest = text.partition(" ")
    if not sep or not topic or "/" not in topic:
        raise Unparseable(f"line {line_no}: expected '<topic> <payload>'")
    return CaptureLine(line_no, topic, rest.encode("utf-8", "surrogatepass"), None)
