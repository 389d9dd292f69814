"""Classification policy v1, one scenario per rule and per "no incident" clause.

Every scenario runs through ``replay`` and through the live ingest path into both stores (a real
SQLite file and a real PostgreSQL database); all must agree. Expected outcomes are written from PROTOCOL.md, by hand.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import audit
from collector.capture import parse_line
from collector.ingest import Collector, Inbound
from collector.replay import replay_stream
from collector.store import is_postgres, open_store
from tests.builder import CAM, SPK, Agent, brief, device, incidents, on_postgres, replay, ts


@pytest.fixture(autouse=True, scope="module")
def _both_stores(postgres_server: Any) -> Iterator[None]:
    """Every scenario's live run on a SQLite file and on a PostgreSQL database (``tests.builder.incidents``)."""
    with on_postgres(postgres_server):
        yield


@pytest.fixture
def store(store_db: str, tmp_path: Path) -> Iterator[Any]:
    """A bare store of each kind (no registry)."""
    if is_postgres(store_db):
        audit.configure(store_db, str(tmp_path / "audit.key"))
    s = open_store(store_db)
    yield s
    s.close()


def test_d2_device_errors_are_a_device_fault(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.control_error")
    a.error(31, CAM, "usb.protocol_error")
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["kind"], inc["cause"], inc["responsible"], inc["rule"]) == (
        "device_error", "device_fault", "central_it", "D2")
    assert inc["confidence"] == 0.8 and inc["opened_at"] == ts(30) and inc["resolved_at"] is None
    assert [e["seq"] for e in inc["evidence"]] == [4, 5]


def test_d3_link_errors_only_need_inspection(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "usb.over_current")
    assert brief(incidents(a.text(), tmp_path)) == [(CAM["key"], "device_error", "D3")]


def test_d1_error_after_a_detach_in_use(tmp_path: Path) -> None:
    a = Agent().started()
    mark = a.detach(30, SPK, in_use=True)
    a.attach(31, SPK)
    a.error(60, SPK, "audio.stream_error")
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["cause"], inc["responsible"], inc["rule"]) == ("handling_damage", "unit", "D1")
    assert {"boot": a.boot, "seq": mark["seq"], "type": "device.detached", "ts": ts(30)} in inc["evidence"]


def test_d1_error_after_a_move_to_another_port(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.attach(32, device(port="2-4"))
    a.error(90, device(port="2-4"), "video.stream_error")
    assert brief(incidents(a.text(), tmp_path)) == [(CAM["key"], "device_error", "D1")]


def test_d1_reported_handling(tmp_path: Path) -> None:
    a = Agent().started()
    a.event("handling.reported", 30, CAM, context={"note": "jatuh dari meja"})
    a.error(40, CAM, "usb.enumeration_failed")
    assert brief(incidents(a.text(), tmp_path)) == [(CAM["key"], "device_error", "D1")]


def test_handling_window_includes_its_end_and_not_beyond(tmp_path: Path) -> None:
    a = Agent().started()
    a.event("handling.reported", 30, CAM, context={"note": "x"})
    a.error(30 + 24 * 60, CAM, "video.stream_error")
    assert brief(incidents(a.text(), tmp_path))[0][2] == "D1"
    b = Agent().started()
    b.event("handling.reported", 30, CAM, context={"note": "x"})
    b.error(30 + 24 * 60 + 0.01, CAM, "video.stream_error")
    assert brief(incidents(b.text(), tmp_path / "b"))[0][2] == "D2"


def test_first_seen_device_has_no_previous_port(tmp_path: Path) -> None:
    a = Agent().started(devices=[SPK])
    a.attach(30, CAM)  # first time this camera is seen: no port change
    a.error(40, CAM, "video.stream_error")
    assert brief(incidents(a.text(), tmp_path)) == [(CAM["key"], "device_error", "D2")]


def test_h1_two_devices_failing_together_is_the_host(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    a.error(31, SPK, "audio.stream_error")  # 60 s later: inside the window (it includes its end)
    incs = incidents(a.text(), tmp_path)
    assert sorted(i["device"] for i in incs) == sorted([CAM["key"], SPK["key"]])
    assert {i["rule"] for i in incs} == {"H1"} and {i["cause"] for i in incs} == {"host_issue"}
    assert {i["responsible"] for i in incs} == {"none"}


def test_h1_is_per_agent(tmp_path: Path) -> None:
    lines: list[str] = []
    a = Agent("room-a", "bootaaaa0001", lines).started()
    b = Agent("room-b", "bootbbbb0001", lines).started()
    a.error(30, CAM, "video.stream_error")
    b.error(30, CAM, "video.stream_error")
    incs = incidents("\n".join(lines), tmp_path)
    assert sorted((i["agent"], i["rule"]) for i in incs) == [("room-a", "D2"), ("room-b", "D2")]


def test_h1_errors_right_after_start(tmp_path: Path) -> None:
    a = Agent().started(at=10)
    a.error(12, CAM, "video.stream_error")  # 120 s after agent.started: included
    assert brief(incidents(a.text(), tmp_path))[0][2] == "H1"
    b = Agent().started(at=10)
    b.error(12.01, CAM, "video.stream_error")
    assert brief(incidents(b.text(), tmp_path / "b"))[0][2] == "D2"


def test_m1_pulled_in_use_and_gone(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM, in_use=True)
    a.telemetry(40.01, [SPK["key"]])  # the clock passes the 10 min window
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["kind"], inc["cause"], inc["responsible"], inc["rule"], inc["confidence"]) == (
        "device_missing", "handling_damage", "unit", "M1", 0.7)
    assert inc["opened_at"] == ts(30)


def test_m2_gone_while_idle(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.telemetry(41, [SPK["key"]])
    assert brief(incidents(a.text(), tmp_path)) == [(CAM["key"], "device_missing", "M2")]


def test_missing_window_has_not_elapsed_yet(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM, in_use=True)
    a.telemetry(40, [SPK["key"]])  # exactly the end: not strictly past it
    assert incidents(a.text(), tmp_path) == []


def test_missing_device_back_inside_ten_minutes_is_no_incident(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM, in_use=True)
    a.attach(40, CAM)  # the window includes its end
    a.telemetry(60, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_missing_resolved_when_seen_again(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.telemetry(45, [SPK["key"]])
    a.attach(50, CAM)
    [inc] = incidents(a.text(), tmp_path)
    assert inc["rule"] == "M2" and inc["resolved_at"] == ts(50)
    assert inc["evidence"][-1]["type"] == "device.attached"


def test_missing_resolved_by_telemetry_present(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.telemetry(45, [SPK["key"]])
    a.telemetry(46, [SPK["key"], CAM["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert inc["resolved_at"] == ts(46)


def test_quick_idle_replug_is_quiet(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.attach(32, CAM)  # 120 s, same port
    a.telemetry(60, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_replug_in_use_is_a_handling_mark_not_an_incident(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM, in_use=True)
    a.attach(30.5, CAM)
    a.telemetry(60, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_detach_during_suspend_is_expected(tmp_path: Path) -> None:
    a = Agent().started()
    a.event("host.suspending", 30)
    a.detach(30.1, CAM)
    a.event("host.resumed", 90)
    a.attach(95, CAM)
    a.telemetry(200, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_u1_three_replugs_in_ten_minutes(tmp_path: Path) -> None:
    a = Agent().started()
    for m in (30, 33, 36):
        a.detach(m, CAM)
        a.attach(m + 0.5, CAM)
    a.telemetry(47, [SPK["key"], CAM["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["kind"], inc["cause"], inc["responsible"], inc["rule"], inc["confidence"]) == (
        "device_unstable", "needs_inspection", "undetermined", "U1", 0.5)
    assert inc["opened_at"] == ts(30)
    assert inc["resolved_at"] == ts(46)  # 10 min without a detach


def test_u1_not_with_errors_in_between(tmp_path: Path) -> None:
    a = Agent().started()
    for m in (30, 33, 36):
        a.detach(m, CAM)
        a.attach(m + 0.5, CAM)
    a.error(36.6, CAM, "usb.reset")  # info: recorded, not trouble
    assert [i["kind"] for i in incidents(a.text(), tmp_path)] == ["device_unstable"]
    b = Agent().started()
    for m in (30, 33, 36):
        b.detach(m, CAM)
        b.attach(m + 0.5, CAM)
        if m == 33:
            b.error(33.7, CAM, "usb.protocol_error")
    kinds = [i["kind"] for i in incidents(b.text(), tmp_path / "b")]
    assert "device_unstable" not in kinds and kinds == ["device_error"]


def test_resolve_and_reopen_within_seven_days(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    a.event("device.recovered", 35, CAM, error={"code": "video.stream_error"})
    a.error(60 * 24 * 7 + 35, CAM, "video.stream_error")  # 7 days after resolution: included
    [inc] = incidents(a.text(), tmp_path)
    assert inc["opened_at"] == ts(30) and inc["resolved_at"] is None
    b = Agent().started()
    b.error(30, CAM, "video.stream_error")
    b.event("device.recovered", 35, CAM, error={"code": "video.stream_error"})
    b.error(60 * 24 * 7 + 36, CAM, "video.stream_error")
    incs = incidents(b.text(), tmp_path / "b")
    assert [(i["opened_at"], i["resolved_at"]) for i in incs] == [(ts(30), ts(35)), (ts(60 * 24 * 7 + 36), None)]


def test_open_error_incident_stays_open_while_missing(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    a.detach(31, CAM)
    a.telemetry(45, [SPK["key"]])
    assert sorted(i["kind"] for i in incidents(a.text(), tmp_path)) == ["device_error", "device_missing"]


def test_device_absent_after_restart_counts_as_detached(tmp_path: Path) -> None:
    a = Agent(boot="bootone00001").started()
    a.event("agent.stopping", 30)
    b = a.restart("boottwo00002").started(at=60, devices=[SPK])
    b.telemetry(75, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert inc["kind"] == "device_missing" and inc["device"] == CAM["key"] and inc["opened_at"] == ts(60)
    # 1.1: an unwatched absence is never host-wide, though it is dated at agent.started
    assert inc["rule"] == "M2" and inc["policy"] == "1.1"
    assert [(e["boot"], e["seq"], e["type"]) for e in inc["evidence"]] == [("boottwo00002", 1, "agent.started")]


def test_clean_stop_carries_pending_windows_and_waits_for_the_next_start(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.event("agent.stopping", 32)
    assert incidents(a.text(), tmp_path / "a") == []  # no start yet: the window waits
    b = a.restart("boottwo00002").started(at=600, devices=[SPK])
    b.telemetry(609, [SPK["key"]])
    assert incidents(a.text(), tmp_path / "b") == []  # 10 min after that start have not passed
    b.telemetry(611, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path / "c")
    assert (inc["kind"], inc["rule"], inc["opened_at"]) == ("device_missing", "M2", ts(30))
    assert [(e["boot"], e["type"]) for e in inc["evidence"]] == [(a.boot, "device.detached"),
                                                                  ("boottwo00002", "agent.started")]


def test_a_device_back_in_the_next_first_inventory_closes_a_carried_window(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM, in_use=True)
    a.event("agent.stopping", 32)
    b = a.restart("boottwo00002").started(at=900)
    b.telemetry(950, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_devices_without_serial(tmp_path: Path) -> None:
    nos = device("1234:5678@2-3", port="2-3", serial=None)
    a = Agent().started(devices=[nos])
    a.error(30, nos, "video.stream_error")
    [inc] = incidents(a.text(), tmp_path)
    assert inc["device"] == "1234:5678@2-3" and inc["rule"] == "D2"


def test_out_of_order_delivery_changes_nothing(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, SPK, in_use=True)
    a.attach(31, SPK)
    a.error(60, SPK, "audio.stream_error")
    a.telemetry(61, [SPK["key"], CAM["key"]])
    lines = a.text().splitlines()
    shuffled = lines[:]
    random.Random(7).shuffle(shuffled)
    assert brief(incidents("\n".join(shuffled), tmp_path)) == brief(incidents(a.text(), tmp_path / "b")) == [
        (SPK["key"], "device_error", "D1")]


def test_late_spooled_attach_withdraws_a_missing_incident(store: Any) -> None:
    lines: list[str] = []
    a = Agent("room-a", "bootaaaa0001", lines).started()
    other = Agent("room-b", "bootbbbb0001", lines).started()
    a.detach(30, CAM)
    attach = a.attach(35, CAM)  # spooled: arrives last, ts inside the window
    a.telemetry(45, [SPK["key"]])  # room-a's own clock passes its window
    other.telemetry(46, [CAM["key"]])
    lines.append(lines.pop(lines.index(next(x for x in lines if json.loads(x)["payload"] == attach))))
    n = len(lines) - 1
    c = Collector(store)
    for i, line in enumerate(lines):
        rec = parse_line(line, i)
        assert rec is not None and isinstance(rec.payload, dict)
        c.ingest([Inbound(rec.topic, json.dumps(rec.payload).encode(), time.time())])
        if i == n - 1:
            assert [r["status"] for r in store.query("SELECT status FROM incidents")] == ["open"]
    c.tick()
    assert [r["status"] for r in store.query("SELECT status FROM incidents")] == ["withdrawn"]
    assert [r["action"] for r in store.query("SELECT action FROM audit ORDER BY id")] == ["opened", "withdrawn"]
    assert replay("\n".join(lines)) == []


def test_duplicates_forgeries_and_garbage_have_no_effect(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    clean = a.text()
    lines = clean.splitlines()
    forged = json.loads(lines[-1])
    forged["payload"]["agent"] = "room-9"
    forged["payload"]["seq"] = 99
    forged["payload"]["device"] = SPK
    noisy = [*lines, *lines[3:], json.dumps(forged), "garbage", '{"topic": 5}', "",
             "pantau/v1/agents/room-1/events not-json"]
    res = replay_stream(io.StringIO("\n".join(noisy)))
    assert res.duplicates == len(lines) - 3
    assert res.rejected == {"agent_mismatch": 1, "bad_json": 1}
    assert res.unparseable == 2
    assert brief(incidents("\n".join(noisy), tmp_path)) == brief(incidents(clean, tmp_path / "clean"))


def test_first_received_copy_of_a_duplicate_wins(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error", seq=10)
    a.error(30, CAM, "usb.over_current", seq=10)  # same (agent, boot, seq): ignored
    assert brief(incidents(a.text(), tmp_path))[0][2] == "D2"


@pytest.mark.parametrize("name", ["camera-control-errors", "speaker-pulled-in-meeting"])
def test_shared_examples(name: str, tmp_path: Path) -> None:
    from tests.conftest import EXAMPLES

    expected = json.loads((EXAMPLES / f"{name}.expected.json").read_text())
    got = incidents((EXAMPLES / f"{name}.capture").read_text(), tmp_path)
    assert [{k: g[k] for k in expected[0]} for g in got] == expected


def test_will_with_a_malformed_received_at_takes_the_clock(store: Any) -> None:
    """Replay and the live path stamp a ts-less will the same way, and never fail on it."""
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    will = {"v": 1, "agent": "room-1", "boot": a.boot, "kind": "state", "state": "offline", "reason": "lost"}
    c = Collector(store)
    for line in a.lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    c.ingest([Inbound("pantau/v1/agents/room-1/state", json.dumps(will).encode(), time.time(), "not a time")])
    [row] = c.store.query("SELECT ts FROM evidence WHERE type = 'state' AND payload LIKE '%offline%'")
    assert row["ts"] == json.loads(a.lines[-1])["payload"]["ts"] == c.ingestor.clocks.ts["room-1"]  # as it stood
    text = a.text() + json.dumps({"topic": "pantau/v1/agents/room-1/state", "payload": will,
                                  "received_at": "not a time"}) + "\n"
    assert [i["rule"] for i in replay(text)] == ["D2"]
