"""Validation matches what JSON and the store accept: each fault class below was once let through
(or raised something other than ProtocolError) and is now rejected with its own reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_PAYLOAD_BYTES,
    REASONS,
    ProtocolError,
    check_ts,
    decode_message,
    dumps_strict,
    encode,
    will_payload,
)

AGENT = "room-1"
TOPIC = f"pantau/v1/agents/{AGENT}/events"
BASE = {"v": 1, "agent": AGENT, "boot": "b00t1234", "seq": 3, "ts": "2026-11-30T03:00:00.123Z"}
DEVICE = {"key": "046d:0843:A1", "vid": "046d", "pid": "0843", "serial": "A1", "kind": "camera",
          "vendor": "Logitech", "product": "Webcam C930e", "port": "1-2.3", "speed": "high", "max_speed": "high",
          "firmware": "0.13"}
ERROR = {"code": "usb.timeout", "source": "kernel", "errno": -110, "problem_code": None, "message": "x", "count": 1}


def event(**over: Any) -> dict[str, Any]:
    p = {**BASE, "kind": "event", "type": "device.error", "device": dict(DEVICE), "context": {}, "error": dict(ERROR)}
    p.update(over)
    return {k: v for k, v in p.items() if v is not ...}


def telemetry(**over: Any) -> dict[str, Any]:
    p = {**BASE, "kind": "telemetry",
         "host": {"cpu_pct": 3.5, "mem_pct": 41.0, "disk_pct": 63.2, "uptime_s": 86400, "temp_c": 48.0},
         "devices": [{"key": "046d:0843:A1", "present": True, "in_use": False, "speed": "high", "errors_total": 0,
                      "resets_total": 0}],
         "spool": {"depth": 0, "dropped_total": 0}}
    p.update(over)
    return p


def state(**over: Any) -> dict[str, Any]:
    p = {**BASE, "kind": "state", "state": "online", "version": "1.0.0", "platform": "linux", "hostname": "h",
         "labels": {"unit": "setjen"}, "interval_s": 30, "spool_dropped": 0}
    p.update(over)
    return {k: v for k, v in p.items() if v is not ...}


def channel(p: dict[str, Any]) -> str:
    return {"event": "events", "telemetry": "telemetry", "state": "state", "inventory": "inventory"}.get(
        str(p.get("kind")), "events")


def reason_of(raw: bytes | str | dict[str, Any], topic: str = TOPIC) -> str:
    with pytest.raises(ProtocolError) as ei:
        decode_message(topic, raw)
    assert ei.value.reason in REASONS
    return ei.value.reason


def reject(p: dict[str, Any]) -> str:
    return reason_of(json.dumps(p).encode(), f"pantau/v1/agents/{AGENT}/{channel(p)}")


def accept(p: dict[str, Any]) -> None:
    decode_message(f"pantau/v1/agents/{AGENT}/{channel(p)}", json.dumps(p).encode())


def test_the_fixtures_are_valid() -> None:
    for p in (event(), telemetry(), state()):
        accept(p)


# ---------------------------------------------------------------- seq within SQLite's INTEGER


def test_seq_must_fit_signed_64_bits() -> None:
    accept(event(seq=INT64_MAX))
    accept(event(seq=0))
    assert reject(event(seq=INT64_MAX + 1)) == "number_out_of_range"
    assert reject(event(seq=2**64)) == "number_out_of_range"


def test_seq_out_of_range_given_as_an_object_is_rejected_too() -> None:
    assert reason_of(event(seq=2**63)) == "number_out_of_range"


@pytest.mark.parametrize(("seq", "expected"), [(3.0, "bad_seq"), (-1, "bad_seq"), (True, "bad_seq"), ("3", "bad_seq"),
                                               (None, "bad_seq")])
def test_seq_is_a_json_integer_at_least_zero(seq: Any, expected: str) -> None:
    assert reject(event(seq=seq)) == expected


# ---------------------------------------------------------------- Unicode


def with_text(p: dict[str, Any], marker: str, replacement: str) -> bytes:
    raw = json.dumps(p)
    assert marker in raw
    return raw.replace(marker, replacement).encode()


@pytest.mark.parametrize("where", ["device.product", "context.note", "error.message", "labels key", "device.key"])
def test_a_lone_surrogate_escape_in_any_string_is_bad_unicode(where: str) -> None:
    p = event(context={"note": "NOTE"}, error={**ERROR, "message": "MSG"},
              device={**DEVICE, "product": "PRODUCT"}, labels={"LABELKEY": 1})
    marker = {"device.product": "PRODUCT", "context.note": "NOTE", "error.message": "MSG", "labels key": "LABELKEY",
              "device.key": "046d:0843:A1"}[where]
    assert reason_of(with_text(p, marker, "x\\ud800y")) == "bad_unicode"
    assert reason_of(with_text(p, marker, "\\udfff")) == "bad_unicode"  # a low half alone
    assert reason_of(with_text(p, marker, "\\ude00\\ud83d")) == "bad_unicode"  # a pair in the wrong order


def test_a_surrogate_pair_escape_is_one_character_and_fine() -> None:
    msg = decode_message(TOPIC, with_text(event(context={"note": "NOTE"}), "NOTE", "ok \\ud83d\\ude00"))
    assert msg.payload["context"]["note"] == "ok \U0001f600"


def test_an_escaped_backslash_before_u_d800_is_plain_text() -> None:
    msg = decode_message(TOPIC, with_text(event(context={"note": "NOTE"}), "NOTE", "\\\\ud800"))
    assert msg.payload["context"]["note"] == "\\ud800"


def test_a_text_or_object_payload_holding_a_lone_surrogate_is_bad_unicode() -> None:
    assert reason_of(json.dumps(event(context={"note": "a\ud800"}), ensure_ascii=False)) == "bad_unicode"
    assert reason_of(event(context={"note": "a\ud800"})) == "bad_unicode"
    assert reason_of(event(context={"\udc00": 1})) == "bad_unicode"


def test_bytes_that_are_not_utf8_stay_bad_json() -> None:
    raw = json.dumps(event(context={"note": "NOTE"})).encode().replace(b"NOTE", b"\xed\xa0\x80")  # CESU surrogate
    assert reason_of(raw) == "bad_json"


# ---------------------------------------------------------------- numbers


def test_a_400_digit_integer_anywhere_is_out_of_range() -> None:
    big = "9" * 400
    assert reason_of(with_text(event(context={"n": 12345}), "12345", big)) == "number_out_of_range"
    assert reason_of(with_text(event(labels={"a": [1, {"b": 12345}]}), "12345", "-" + big)) == "number_out_of_range"
    assert reason_of(with_text(event(), '"v": 1', '"v": ' + big)) == "number_out_of_range"
    assert reason_of(with_text(event(context={"n": 12345}), "12345", "1" * 5000)) == "number_out_of_range"


def test_integers_at_the_64_bit_edges_are_fine_anywhere() -> None:
    accept(event(context={"lo": INT64_MIN, "hi": INT64_MAX}))
    assert reject(event(context={"n": INT64_MIN - 1})) == "number_out_of_range"
    assert reject(event(context={"n": [INT64_MAX + 1]})) == "number_out_of_range"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 400 + ".0"])
def test_non_finite_numbers_anywhere_are_rejected(literal: str) -> None:
    raw = with_text(telemetry(), '"cpu_pct": 3.5', f'"cpu_pct": {literal}')
    assert reason_of(raw, "pantau/v1/agents/room-1/telemetry") == "non_finite"
    assert reason_of(with_text(event(context={"x": [0.5]}), "0.5", literal)) == "non_finite"


def test_non_finite_floats_in_an_object_payload_are_rejected() -> None:
    assert reason_of(event(context={"x": float("nan")})) == "non_finite"
    assert reason_of(telemetry(host={"cpu_pct": float("inf")}), "pantau/v1/agents/room-1/telemetry") == "non_finite"


def test_tiny_floats_are_finite_and_fine() -> None:
    accept(event(context={"x": 1e-300}))
    accept(telemetry(host={"cpu_pct": 5e-324}))


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("cpu_pct", 100.5, "number_out_of_range"),
        ("cpu_pct", -0.1, "number_out_of_range"),
        ("mem_pct", 101, "number_out_of_range"),
        ("disk_pct", -1, "number_out_of_range"),
        ("temp_c", -50.5, "number_out_of_range"),
        ("temp_c", 150.5, "number_out_of_range"),
        ("uptime_s", -1, "number_out_of_range"),
        ("uptime_s", 10**12, "number_out_of_range"),
        ("cpu_pct", "3.5", "bad_type"),
        ("cpu_pct", True, "bad_type"),
        ("temp_c", [48], "bad_type"),
    ],
)
def test_host_gauges_are_numbers_within_bounds(member: str, value: Any, expected: str) -> None:
    assert reject(telemetry(host={**telemetry()["host"], member: value})) == expected


def test_host_gauges_at_their_bounds_or_null_are_fine() -> None:
    accept(telemetry(host={"cpu_pct": 0, "mem_pct": 100, "disk_pct": 100.0, "uptime_s": 0, "temp_c": -50}))
    accept(telemetry(host={"cpu_pct": None, "mem_pct": None, "disk_pct": None, "uptime_s": None, "temp_c": 150}))
    accept(telemetry(host={}))


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"errors_total": -1}, "number_out_of_range"),
        ({"resets_total": -5}, "number_out_of_range"),
        ({"errors_total": 1.5}, "bad_type"),
        ({"errors_total": "3"}, "bad_type"),
        ({"resets_total": False}, "bad_type"),
        ({"present": "yes"}, "bad_type"),
    ],
)
def test_device_counters_are_integers_at_least_zero(device: dict[str, Any], expected: str) -> None:
    p = telemetry()
    p["devices"][0].update(device)
    assert reject(p) == expected


@pytest.mark.parametrize(
    ("spool", "expected"),
    [({"depth": -1}, "number_out_of_range"), ({"dropped_total": 0.5}, "bad_type"), ([], "bad_type")],
)
def test_spool_counters(spool: Any, expected: str) -> None:
    assert reject(telemetry(spool=spool)) == expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"errno": 2**31}, "number_out_of_range"),
        ({"errno": -71.0}, "bad_type"),
        ({"problem_code": -1}, "number_out_of_range"),
        ({"problem_code": 2**32}, "number_out_of_range"),
        ({"count": 0}, "bad_type"),
        ({"message": 5}, "bad_type"),
    ],
)
def test_error_numbers(error: dict[str, Any], expected: str) -> None:
    assert reject(event(error={**ERROR, **error})) == expected


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"interval_s": 0}, "number_out_of_range"),
        ({"interval_s": -30}, "number_out_of_range"),
        ({"interval_s": 8 * 86400}, "number_out_of_range"),
        ({"interval_s": "30"}, "bad_type"),
        ({"spool_dropped": -1}, "number_out_of_range"),
        ({"hostname": 5}, "bad_type"),
        ({"labels": []}, "bad_type"),
    ],
)
def test_state_members(over: dict[str, Any], expected: str) -> None:
    assert reject(state(**over)) == expected


def test_fractional_interval_is_fine() -> None:
    accept(state(interval_s=0.5))


# ---------------------------------------------------------------- enums


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"speed": []}, "bad_enum"),
        ({"speed": {}}, "bad_enum"),
        ({"speed": "warp"}, "bad_enum"),
        ({"speed": "HIGH"}, "bad_enum"),
        ({"max_speed": "ludicrous"}, "bad_enum"),
        ({"max_speed": []}, "bad_enum"),
        ({"kind": "toaster"}, "bad_enum"),
        ({"kind": 1}, "bad_enum"),
        ({"vendor": ["Logitech"]}, "bad_type"),
        ({"port": 3}, "bad_type"),
        ({"serial": {"a": 1}}, "bad_type"),
    ],
)
def test_device_enums_and_text(device: dict[str, Any], expected: str) -> None:
    assert reject(event(device={**DEVICE, **device})) == expected
    inv = {**BASE, "kind": "inventory", "devices": [dict(DEVICE), {**DEVICE, **device}]}
    assert reject(inv) == expected
    tel = telemetry()
    tel["devices"][0].update(device)
    assert reject(tel) == expected


def test_device_enum_values_that_are_known_or_null_where_allowed() -> None:
    for speed in ("low", "full", "high", "super", "super_plus", "unknown"):
        accept(event(device={**DEVICE, "speed": speed, "max_speed": speed}))
    accept(event(device={**DEVICE, "max_speed": None, "serial": None, "vendor": None}))
    accept(event(device={**DEVICE, "speed": None, "kind": None}))  # null reads as absent


def test_a_non_boolean_in_use_reads_as_false_and_is_accepted() -> None:
    """PROTOCOL.md: a missing or non-boolean ``in_use`` reads as false."""
    for v in ("yes", 1, None, [], {"a": 1}):
        accept(event(context={"in_use": v, "users": [], "meeting": v}))
    tel = telemetry()
    tel["devices"][0]["in_use"] = "no"
    accept(tel)
    for kind in ("camera", "speakerphone", "speaker", "microphone", "other"):
        accept(event(device={**DEVICE, "kind": kind}))


@pytest.mark.parametrize("source", [[], {}, "firmware", 3, "KERNEL"])
def test_error_source_is_an_enum(source: Any) -> None:
    assert reject(event(error={**ERROR, "source": source})) == "bad_enum"


def test_error_source_may_be_null_or_absent() -> None:
    accept(event(error={**ERROR, "source": None}))
    accept(event(error={"code": "usb.timeout"}))


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (state(state="zombie"), "bad_enum"),
        (state(state="offline", reason="tired"), "bad_enum"),
        (state(state="offline", reason=None), "bad_enum"),
        (event(type="handling.reported", error=..., context={"via": "pigeon"}), "bad_enum"),
        (event(type="handling.reported", error=..., context={"via": []}), "bad_enum"),
    ],
)
def test_other_enums(p: dict[str, Any], expected: str) -> None:
    assert reject(p) == expected


# ---------------------------------------------------------------- timestamps


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00Z", "1969-12-31T23:59:59.999Z", "2101-01-01T00:00:00Z",
                                "9999-12-31T23:59:59Z"])
def test_ts_years_outside_1970_2100_are_out_of_range(ts: str) -> None:
    assert reject(event(ts=ts)) == "ts_out_of_range"


@pytest.mark.parametrize("ts", ["1970-01-01T00:00:00Z", "2000-01-01T00:00:00Z", "2100-12-31T23:59:59.999999999Z"])
def test_ts_years_at_the_edges_are_fine(ts: str) -> None:
    """A clock reset to 1970 or 2000 by a dead CMOS battery is still a clock, judged on its own."""
    accept(event(ts=ts))
    accept(event(type="agent.started", device=..., error=..., context={"host_boot": ts, "prev_boot": None}))


@pytest.mark.parametrize("host_boot", ["0001-01-01T00:00:00Z", "1969-12-31T23:57:00Z"])
def test_host_boot_is_informational_any_year(host_boot: str) -> None:
    accept(event(type="agent.started", device=..., error=..., context={"host_boot": host_boot, "prev_boot": None}))


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-30t03:00:00Z",
        "2026-11-30T03:00:00z",
        "2026-11-30T03:00:00",
        "2026-11-30T03:00:60Z",
        "2026-11-30T24:00:00Z",
        "2026-11-30T03:00:00.Z",
        "2026-11-30T03:00:00.1234567890Z",
        "2026-11-30T03:00:00Z\n",
        "\u0662\u0660\u0662\u0666-11-30T03:00:00Z",  # Arabic-Indic digits are digits to \d, not to the wire
        "2026-11-30T03:00:00,123Z",
        "",
    ],
)
def test_ts_format_is_strict(ts: str) -> None:
    assert reject(event(ts=ts)) == "bad_ts"


@pytest.mark.parametrize("host_boot", ["yesterday", 12345, "2026-11-30T03:00:00+07:00"])
def test_host_boot_is_a_wire_timestamp(host_boot: Any) -> None:
    assert reject(event(type="agent.started", device=..., error=..., context={"host_boot": host_boot})) == "bad_ts"


def test_check_ts_returns_seconds_and_names_the_member() -> None:
    assert check_ts("2000-01-01T00:00:00Z") == 946684800.0
    with pytest.raises(ProtocolError) as ei:
        check_ts("1969-01-01T00:00:00Z", "ts")
    assert ei.value.reason == "ts_out_of_range" and "ts" in ei.value.detail


# ---------------------------------------------------------------- duplicate members


@pytest.mark.parametrize(
    ("marker", "duplicated"),
    [
        ('"v": 1', '"v": 1, "v": 1'),
        ('"seq": 3', '"seq": 3, "seq": 4'),
        ('"kind": "camera"', '"kind": "camera", "kind": "camera"'),
        ('"note": "n"', '"note": "n", "note": "m"'),
        ('"deep": {"a": 1}', '"deep": [{"a": 1, "a": 2}]'),
    ],
)
def test_duplicate_members_anywhere_are_rejected(marker: str, duplicated: str) -> None:
    p = event(context={"note": "n", "deep": {"a": 1}})
    assert reason_of(with_text(p, marker, duplicated)) == "duplicate_key"


def test_a_member_spelled_twice_through_escapes_is_a_duplicate() -> None:
    raw = with_text(event(), '"seq": 3', '"seq": 3, "s\\u0065q": 4')
    assert reason_of(raw) == "duplicate_key"


# ---------------------------------------------------------------- envelope rules


@pytest.mark.parametrize("v", [True, 1.0, "1", None, [1]])
def test_v_is_exactly_the_integer_1(v: Any) -> None:
    assert reject(event(v=v)) == "bad_type"


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"type": "device.error", "error": None}, "missing_member"),
        ({"type": "device.error", "error": ...}, "missing_member"),
        ({"type": "device.error", "error": {"source": "kernel"}}, "missing_member"),
        ({"type": "device.error", "error": {"code": 71}}, "bad_type"),
        ({"type": "device.error", "error": "usb.timeout"}, "bad_type"),
        ({"type": "device.attached", "device": {"key": ""}}, "bad_device"),
        ({"type": "device.attached", "device": None}, "bad_device"),
        ({"type": "device.exploded"}, "unknown_type"),
        ({"kind": "gossip"}, "unknown_kind"),
    ],
)
def test_event_shape(over: dict[str, Any], expected: str) -> None:
    assert reject(event(**over)) == expected


@pytest.mark.parametrize("devices", [None, {}, "x", [None], [[]], [{"key": 5}], [{"present": True}]])
def test_inventory_and_telemetry_devices_are_a_list_of_keyed_objects(devices: Any) -> None:
    expected = "bad_type" if not isinstance(devices, list) else "bad_device"
    assert reject({**BASE, "kind": "inventory", "devices": devices}) == expected
    assert reject(telemetry(devices=devices)) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "pantau/v1/agents/room-1\n/events",
        "pantau/v1/agents/room-1/events\n",
        "pantau/v1/agents/r\u00f6om/events",
        "pantau/v1/agents/" + "a" * 65 + "/events",
        "pantau/v1/agents//events",
        "pan+tau/v1/agents/room-1/events",
        "#/v1/agents/room-1/events",
        "pan\0tau/v1/agents/room-1/events",
        "\ud800/v1/agents/room-1/events",
        "a/b/v1/agents/room-1/events",
        "/v1/agents/room-1/events",
    ],
)
def test_topic_agent_id_charset_and_one_level_prefix(topic: str) -> None:
    assert reason_of(json.dumps(event()).encode(), topic) == "bad_topic"


def test_only_the_fixed_will_may_leave_out_ts_and_seq() -> None:
    decode_message("pantau/v1/agents/room-1/state", encode(will_payload(AGENT, "b00t1234")))
    assert reject(state(state="offline", reason="lost", ts=...)) == "missing_member"  # seq without ts
    assert reject(state(state="offline", reason="lost", seq=...)) == "missing_member"  # ts without seq
    assert reject(state(ts=..., seq=...)) == "missing_member"  # online is never a will
    assert reject(event(ts=..., seq=...)) == "missing_member"


def test_the_size_limit_is_on_utf8_bytes() -> None:
    pad = "\u00e9" * (MAX_PAYLOAD_BYTES // 2)  # fewer characters than the limit, more bytes
    text = json.dumps(event(context={"note": pad}), ensure_ascii=False)
    assert len(text) < MAX_PAYLOAD_BYTES < len(text.encode())
    assert reason_of(text) == "too_large"
    assert reason_of(text.encode()) == "too_large"
    assert reason_of(event(context={"note": pad})) == "too_large"


def test_an_object_payload_is_measured_as_compact_json() -> None:
    base = len(dumps_strict(event(context={"note": ""})).encode())
    fits = event(context={"note": "x" * (MAX_PAYLOAD_BYTES - base)})
    decode_message(TOPIC, fits)
    assert reason_of(event(context={"note": "x" * (MAX_PAYLOAD_BYTES - base + 1)})) == "too_large"


def test_unencodable_object_payloads_are_bad_json() -> None:
    assert reason_of(event(context={"when": {1, 2}})) == "bad_json"
    loop: dict[str, Any] = event()
    loop["context"] = {"self": loop}
    assert reason_of(loop) == "bad_json"


# ---------------------------------------------------------------- the strict serialiser


def test_dumps_strict_is_compact_and_keeps_text() -> None:
    text = dumps_strict({"a": [1, 2.5, None], "b": "r\u00f6om \U0001f600"})
    assert text == '{"a":[1,2.5,null],"b":"r\u00f6om \U0001f600"}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "\ud800", {"\udc00": 1}])
def test_dumps_strict_refuses_what_strict_readers_reject(bad: Any) -> None:
    with pytest.raises(ValueError):
        dumps_strict({"x": [bad]})


def test_dumps_strict_output_is_accepted_by_the_decoder() -> None:
    p = event(context={"note": "catatan \u00e9 \U0001f600", "users": ["zoom"]})
    assert decode_message(TOPIC, dumps_strict(p)).payload == p
    assert decode_message(TOPIC, dumps_strict(p).encode()).payload == p


def test_only_a_handling_report_with_seq_1_may_use_a_dashboard_boot() -> None:
    dash = "dashboard-0123456789ab"
    accept(event(boot=dash, seq=1, type="handling.reported", error=..., context={"note": "jatuh", "via": "dashboard"}))
    assert reject(event(boot=dash, seq=1)) == "bad_boot"  # a device.error
    assert reject(event(boot=dash, seq=2, type="handling.reported", error=..., context={"note": "x"})) == "bad_boot"
    assert reject(telemetry(boot=dash)) == "bad_boot"


@pytest.mark.parametrize("key", ["k\nline", "a\x00b", "x" * 257, "\t046d:0843:A1"])
def test_device_keys_without_control_characters_and_bounded(key: str) -> None:
    assert reject(event(device={**DEVICE, "key": key})) == "bad_device"
    tel = telemetry()
    tel["devices"][0]["key"] = key
    assert reject(tel) == "bad_device"
