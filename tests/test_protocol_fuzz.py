"""Property tests: whatever JSON text arrives — with lone surrogates, huge integers, duplicate members
nested anywhere, NaN and infinities — the decoder raises only ProtocolError, rejects every text that
has one of those faults, and what it accepts can be written out again by a strict serialiser."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol as P
from common.protocol import INT64_MAX, INT64_MIN, ProtocolError, decode_message

TOPICS = {"event": "pantau/v1/agents/room-1/events", "telemetry": "pantau/v1/agents/room-1/telemetry",
          "inventory": "pantau/v1/agents/room-1/inventory", "state": "pantau/v1/agents/room-1/state"}

# ------------------------------------------------------------ JSON text, faults included

number_literals = st.sampled_from([
    "0", "-0", "1", "3.0", "1.5e3", "-2.5E-3", "1e-400", "NaN", "Infinity", "-Infinity", "1e999", "-1e999",
    "1" + "0" * 400 + ".5", "9" * 400, "-" + "9" * 400, str(INT64_MAX), str(INT64_MAX + 1), str(INT64_MIN),
    str(INT64_MIN - 1), str(2**64),
]) | st.integers().map(str) | st.floats(allow_nan=False, allow_infinity=False).map(repr)
string_literals = st.text(max_size=12).map(json.dumps) | st.sampled_from([
    '"\\ud800"', '"a\\udfff"', '"\\ud83d\\ude00"', '"\\ude00\\ud83d"', '"\\\\ud800"', '"x\\ud83d"', '"\\u0000"',
])
names = st.sampled_from(["key", "speed", "kind", "seq", "a", "b", "s\\u0065q", "\\ud800", "cpu_pct", "count"])
scalar_texts = number_literals | string_literals | st.sampled_from(["null", "true", "false"])


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
    objects = st.lists(st.tuples(names, children), max_size=4).map(
        lambda kv: "{" + ",".join(f'"{k}":{v}' for k, v in kv) + "}")
    return arrays | objects


json_texts = st.recursive(scalar_texts, _containers, max_leaves=16)


def _envelope_text(kind: str, members: list[tuple[str, str]]) -> str:
    """A valid message of ``kind`` as JSON text, with ``members`` added or replacing its own (a
    replaced member keeps its place; a name given twice stays twice)."""
    base: dict[str, Any] = {"v": 1, "agent": "room-1", "boot": "b00t1234", "seq": 7, "ts": "2026-11-30T03:00:00Z",
                            "kind": kind}
    if kind == "event":
        base.update(type="device.error", device={"key": "k1", "speed": "high", "kind": "camera"}, context={},
                    error={"code": "usb.timeout", "source": "kernel", "count": 1})
    elif kind == "telemetry":
        base.update(host={"cpu_pct": 3.5, "temp_c": None}, devices=[{"key": "k1", "present": True,
                                                                     "errors_total": 0}])
    elif kind == "inventory":
        base.update(devices=[{"key": "k1", "speed": "super", "max_speed": None}])
    else:
        base.update(state="online", interval_s=30)
    parts = {k: json.dumps(v) for k, v in base.items()}
    extra: list[tuple[str, str]] = []
    for name, text in members:
        if name in parts and name not in dict(extra):
            parts[name] = text
        else:
            extra.append((name, text))
    return "{" + ",".join(f'"{k}":{v}' for k, v in [*parts.items(), *extra]) + "}"


member_names = st.sampled_from(["v", "seq", "ts", "kind", "type", "device", "error", "context", "devices", "host",
                                "state", "labels", "spool", "interval_s", "extra"])
envelopes = st.builds(_envelope_text, st.sampled_from(sorted(TOPICS)),
                      st.lists(st.tuples(member_names, json_texts), max_size=3))

# ------------------------------------------------------------ an independent oracle


class _Fault(Exception):
    pass


def _oracle_faults(text: str) -> list[str]:
    """Which strictness faults ``text`` has, found by a plain parse with recording hooks."""
    faults: list[str] = []

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in kv}) != len(kv):
            faults.append("duplicate_key")
        return dict(kv)

    def integer(s: str) -> int:
        v = int(s) if len(s) < 4000 else 10**4000
        if not INT64_MIN <= v <= INT64_MAX:
            faults.append("number_out_of_range")
        return 0

    def number(s: str) -> float:
        if not math.isfinite(float(s)):
            faults.append("non_finite")
        return 0.0

    def constant(s: str) -> float:
        faults.append("non_finite")
        return 0.0

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_int=integer, parse_float=number,
                           parse_constant=constant)
    except ValueError:
        return ["bad_json"]
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        faults.append("bad_unicode")
    return faults


def _ints(v: Any) -> list[int]:
    if isinstance(v, dict):
        return [i for x in v.values() for i in _ints(x)]
    if isinstance(v, list):
        return [i for x in v for i in _ints(x)]
    return [v] if isinstance(v, int) and not isinstance(v, bool) else []


def _check(topic: str, raw: bytes | str | dict[str, Any], text: str | None) -> None:
    try:
        msg = decode_message(topic, raw)
    except ProtocolError as exc:
        assert exc.reason in P.REASONS
        return
    if text is not None:
        assert _oracle_faults(text) == [], "accepted a text with a strictness fault"
    json.dumps(msg.payload, allow_nan=False, ensure_ascii=False).encode("utf-8")  # raises on NaN, surrogates
    assert json.loads(P.dumps_strict(msg.payload).encode("utf-8")) == msg.payload
    assert all(INT64_MIN <= i <= INT64_MAX for i in _ints(msg.payload))
    assert msg.seq is None or 0 <= msg.seq <= INT64_MAX


@settings(max_examples=600, deadline=None)
@given(json_texts)
def test_any_json_text_only_raises_protocol_error(text: str) -> None:
    _check(TOPICS["event"], text.encode("utf-8", "surrogatepass"), text)
    _check(TOPICS["event"], text, text)


@settings(max_examples=800, deadline=None)
@given(envelopes)
def test_envelope_shaped_text_with_faults_is_rejected_and_the_rest_round_trips(text: str) -> None:
    kind = json.loads(text, object_pairs_hook=lambda kv: dict(kv), parse_constant=lambda s: 0).get("kind")
    topic = TOPICS.get(kind, TOPICS["event"]) if isinstance(kind, str) else TOPICS["event"]
    faults = _oracle_faults(text)
    try:
        decode_message(topic, text.encode())
    except ProtocolError:
        pass
    else:
        assert faults == [], f"accepted despite {faults}"
    _check(topic, text.encode(), text)


scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(
    alphabet=st.characters(exclude_categories=()), max_size=8)  # lone surrogates (Cs) included
json_objects = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=4), max_leaves=16)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(member_names, json_objects, max_size=4), st.sampled_from(sorted(TOPICS)))
def test_object_payloads_only_raise_protocol_error(members: dict[str, Any], kind: str) -> None:
    p = json.loads(_envelope_text(kind, []))
    p.update(members)
    _check(TOPICS.get(str(p.get("kind")), TOPICS["event"]), p, None)


# ------------------------------------------------------------ the fast member tables agree with the checks

member_values = st.none() | st.booleans() | st.integers(min_value=-(2**40), max_value=2**64) | st.floats(
    allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e13) | st.sampled_from(
    ["high", "super", "camera", "kernel", "agent", "dashboard", "x", "", "HIGH", "2026-11-30T03:00:00Z",
     "1999-01-01T00:00:00Z"]) | st.lists(st.sampled_from(["zoom", 1]), max_size=2)


def _outcome(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except ProtocolError as exc:
        return exc.reason
    return None


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(P._FAST_DEVICE), "key", "in_use"]), member_values, max_size=6),
       st.dictionaries(st.sampled_from([*sorted(P._FAST_HOST), "load"]), member_values, max_size=4),
       st.dictionaries(st.sampled_from([*sorted(P._FAST_CONTEXT), "source"]), member_values, max_size=4),
       st.dictionaries(st.sampled_from(sorted(P._FAST_ERROR)), member_values, max_size=4))
def test_fast_tables_never_pass_what_the_checks_reject(device: dict[str, Any], host: dict[str, Any],
                                                       context: dict[str, Any], error: dict[str, Any]) -> None:
    for obj, table, explain in ((device, P._FAST_DEVICE, lambda o: P._explain_device(o, "device")),
                                (host, P._FAST_HOST, P._explain_host),
                                (context, P._FAST_CONTEXT, P._explain_context),
                                (error, P._FAST_ERROR, P._explain_error)):
        if P._fast_ok(obj, table):
            assert _outcome(explain, obj) is None, (obj, "passed the table but not the checks")
    keyed = {**device, "key": "k1"}
    assert _outcome(P.check_device, keyed, "device") == _outcome(P._explain_device, keyed, "device")
