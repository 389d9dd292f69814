"""The wire contract: every invalid-input class is rejected with its reason, and validation
never raises anything but ProtocolError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.protocol import (
    MAX_PAYLOAD_BYTES,
    ProtocolError,
    decode_message,
    device_key,
    encode,
    parse_topic,
    topic_for,
    will_payload,
)

TOPIC = "pantau/v1/agents/room-1/events"


def ev(**over: Any) -> dict[str, Any]:
    p = {"v": 1, "agent": "room-1", "boot": "b00t1234", "seq": 3, "ts": "2026-11-30T03:00:00.123Z", "kind": "event",
         "type": "device.error", "device": {"key": "046d:0843:A1"}, "context": {},
         "error": {"code": "usb.timeout", "source": "kernel", "errno": -110, "problem_code": None,
                   "message": "x", "count": 1}}
    p.update(over)
    return {k: v for k, v in p.items() if v is not ...}


def reason(topic: str, payload: Any) -> str:
    with pytest.raises(ProtocolError) as ei:
        decode_message(topic, payload if isinstance(payload, bytes | str) else json.dumps(payload).encode())
    return ei.value.reason


def test_valid_event_round_trips() -> None:
    msg = decode_message(TOPIC, encode(ev()))
    assert (msg.agent, msg.boot, msg.seq, msg.kind) == ("room-1", "b00t1234", 3, "event")
    assert msg.key == ("room-1", "b00t1234", 3)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "not_object"),
        (b'{"v": NaN}', "non_finite"),
        (b'{"v": 1, "v": 1}', "duplicate_key"),
        (ev(v=2), "bad_version"),
        (ev(v="1"), "bad_type"),
        (ev(v=...), "missing_member"),
        (ev(ts="2026-11-30 03:00:00Z"), "bad_ts"),
        (ev(ts="2026-11-30T03:00:00+07:00"), "bad_ts"),
        (ev(ts="2026-02-30T03:00:00Z"), "bad_ts"),
        (ev(ts=12345), "bad_ts"),
        (ev(ts=...), "missing_member"),
        (ev(seq=-1), "bad_seq"),
        (ev(seq=1.5), "bad_seq"),
        (ev(seq=True), "bad_seq"),
        (ev(seq=...), "missing_member"),
        (ev(boot="short"), "bad_boot"),
        (ev(agent="room-2"), "agent_mismatch"),
        (ev(kind="alarm"), "unknown_kind"),
        (ev(kind="telemetry", devices=[]), "kind_mismatch"),
        (ev(type="device.exploded"), "unknown_type"),
        (ev(error={"code": "usb.gremlins"}), "unknown_code"),
        (ev(device={"vid": "046d"}), "bad_device"),
        (ev(device="046d:0843"), "bad_device"),
        (ev(device=...), "bad_device"),
        (ev(type="device.recovered", error=...), "missing_member"),
        (ev(context=[]), "bad_type"),
    ],
)
def test_invalid_payload_reasons(payload: Any, expected: str) -> None:
    assert reason(TOPIC, payload) == expected


def test_oversized_payload_is_rejected_before_parsing() -> None:
    big = encode(ev())[:-1] + b', "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    assert reason(TOPIC, big) == "too_large"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("pantau/v1/agents/Room-1/events", "bad_topic"),
        ("pantau/v2/agents/room-1/events", "bad_version"),
        ("pantau/v1/agents/room-1/alarms", "bad_topic"),
        ("pantau/x/v1/agents/room-1/events", "bad_topic"),
        ("pantau/v1/agents/room-1", "bad_topic"),
    ],
)
def test_bad_topics(topic: str, expected: str) -> None:
    assert reason(topic, ev()) == expected


def test_will_has_no_ts_or_seq_and_is_valid() -> None:
    msg = decode_message("pantau/v1/agents/room-1/state", encode(will_payload("room-1", "b00t1234")))
    assert msg.seq is None and msg.ts is None and msg.key is None


def test_state_other_than_a_will_needs_ts_and_seq() -> None:
    p = {"v": 1, "agent": "room-1", "boot": "b00t1234", "kind": "state", "state": "online"}
    assert reason("pantau/v1/agents/room-1/state", p) == "missing_member"


def test_inventory_devices_need_keys() -> None:
    p = {"v": 1, "agent": "room-1", "boot": "b00t1234", "seq": 1, "ts": "2026-11-30T03:00:00Z", "kind": "inventory",
         "devices": [{"key": 5}]}
    assert reason("pantau/v1/agents/room-1/inventory", p) == "bad_device"


def test_topic_builders_and_keys() -> None:
    assert topic_for("room-1", "events") == TOPIC
    assert parse_topic(TOPIC).channel == "events"
    with pytest.raises(ValueError):
        topic_for("Bad Id", "events")
    assert device_key("046d", "0843", "A1B2", "1-2") == "046d:0843:A1B2"
    assert device_key("046d", "0843", None, "1-2.3") == "046d:0843@1-2.3"
    assert device_key("046d", "0843", "  ", "1-2") == "046d:0843@1-2"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048), st.text(max_size=80))
def test_arbitrary_bytes_only_raise_protocol_error(raw: bytes, topic: str) -> None:
    for t in (topic, TOPIC):
        try:
            decode_message(t, raw)
        except ProtocolError:
            pass


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json_only_raises_protocol_error(value: Any) -> None:
    try:
        decode_message(TOPIC, json.dumps(value).encode())
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "agent", "boot", "seq", "ts", "kind", "type", "device", "error",
                                        "context", "devices", "host", "state"]), json_values))
def test_envelope_shaped_json_only_raises_protocol_error(overrides: dict[str, Any]) -> None:
    p = ev()
    p.update(overrides)
    try:
        decode_message(TOPIC, json.dumps(p).encode())
    except ProtocolError:
        pass
