"""Policy 1.1, clause by clause: per-agent clocks, unwatched absences, windows carried across a stop,
boots chained by prev_boot, wills, dashboard reports, U1 cycles and host-wide trouble.

Every scenario runs through ``replay`` and through the live ingest path into both stores (a real SQLite
file and a real PostgreSQL database), and all must agree (``tests.builder.incidents``). Expected outcomes
are written from PROTOCOL.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from collector.store import open_store
from tests.builder import CAM, SPK, T0, Agent, brief, incidents, live, on_postgres, replay, stores, ts


@pytest.fixture(autouse=True, scope="module")
def _both_stores(postgres_server: Any) -> Iterator[None]:
    """Every scenario's live run on a SQLite file and on a PostgreSQL database (``tests.builder.incidents``)."""
    with on_postgres(postgres_server):
        yield


DAY = 24 * 60.0


def test_pulled_in_a_meeting_then_a_clean_shutdown_gone_next_morning_is_m1(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(16 * 60, CAM, in_use=True)  # 17:00 local, mid-meeting
    a.event("agent.stopping", 16 * 60 + 2)  # the PC is shut down two minutes later
    b = a.restart("bootmorning01").started(at=DAY - 60, devices=[SPK])  # next morning, no camera
    b.telemetry(DAY - 50, [SPK["key"]])
    assert incidents(a.text(), tmp_path / "early") == []  # 10 min after that start have not passed
    b.telemetry(DAY - 49, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["kind"], inc["rule"], inc["cause"], inc["responsible"]) == (
        "device_missing", "M1", "handling_damage", "unit")
    assert inc["opened_at"] == ts(16 * 60)  # the detach keeps its own ts and context
    assert [(e["boot"], e["type"]) for e in inc["evidence"]] == [
        (a.boot, "device.detached"), ("bootmorning01", "agent.started")]


def test_a_kit_gone_over_a_weekend_is_two_m2_not_a_host_issue(tmp_path: Path) -> None:
    a = Agent().started()
    a.event("agent.stopping", 8 * 60)  # Friday evening, clean
    b = a.restart("bootmonday001").started(at=3 * DAY, devices=[])  # Monday: nothing attached
    b.telemetry(3 * DAY + 11, [])
    b.event("device.usage", 3 * DAY + 12, {"key": "x:y:z", "vid": "0000", "pid": "0000"},
            context={"in_use": False, "users": [], "meeting": False})
    incs = incidents(a.text(), tmp_path)
    assert sorted(brief(incs)) == sorted([(CAM["key"], "device_missing", "M2"), (SPK["key"], "device_missing", "M2")])
    for inc in incs:
        assert inc["responsible"] == "undetermined" and inc["opened_at"] == ts(3 * DAY)
        assert [(e["boot"], e["type"]) for e in inc["evidence"]] == [("bootmonday001", "agent.started")]


def _sleep(a: Agent, at: float) -> None:
    a.event("host.suspending", at)


def test_one_device_gone_during_sleep_and_not_back_is_m2(tmp_path: Path) -> None:
    a = Agent().started()
    _sleep(a, 60)
    a.detach(61, CAM)
    a.event("host.resumed", 120)
    a.telemetry(131, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["device"], inc["kind"], inc["rule"]) == (CAM["key"], "device_missing", "M2")
    assert inc["opened_at"] == ts(61)  # its detach's own ts
    assert [e["type"] for e in inc["evidence"]] == ["device.detached", "host.resumed"]


def test_a_device_back_six_minutes_after_waking_is_quiet(tmp_path: Path) -> None:
    a = Agent().started()
    _sleep(a, 60)
    a.detach(61, CAM)
    a.event("host.resumed", 120)
    a.attach(126, CAM)
    a.telemetry(200, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_a_kit_gone_during_sleep_is_two_m2(tmp_path: Path) -> None:
    a = Agent().started()
    _sleep(a, 60)
    a.detach(61, CAM)
    a.detach(61, SPK)
    a.event("host.resumed", 120)
    a.telemetry(131, [])
    a.event("device.usage", 131, {"key": "x:y:z"}, context={"in_use": False, "users": [], "meeting": False})
    assert sorted(brief(incidents(a.text(), tmp_path))) == sorted(
        [(CAM["key"], "device_missing", "M2"), (SPK["key"], "device_missing", "M2")])


def test_a_sleep_detach_pending_when_the_boot_ends_is_judged_from_the_next_start(tmp_path: Path) -> None:
    a = Agent().started()
    _sleep(a, 60)
    a.detach(61, CAM, in_use=True)
    a.will()  # the PC never woke: its connection dropped
    b = a.restart("bootnext00001").started(at=300, devices=[SPK])
    b.telemetry(309, [SPK["key"]])
    assert incidents(a.text(), tmp_path / "a") == []
    b.telemetry(311, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path / "b")
    assert (inc["rule"], inc["opened_at"]) == ("M1", ts(61))  # with the detach's own in_use; never host-wide
    assert [e["type"] for e in inc["evidence"]] == ["device.detached", "agent.started"]


def test_another_agents_clock_five_years_ahead_changes_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    a = Agent("room-a", "bootroomA001", lines).started()
    a.detach(30, CAM)
    r = Agent("room-r", "bootroomR001", lines, base=T0 + timedelta(days=5 * 365)).started()
    r.telemetry(1, [])
    a.attach(34, CAM)  # an idle camera put back after 4 minutes
    a.detach(40, SPK, in_use=True)
    a.attach(41, SPK)
    a.telemetry(45, [CAM["key"], SPK["key"]])
    r.telemetry(2, [])
    a.error(50, SPK, "audio.stream_error")
    assert brief(incidents("\n".join(lines) + "\n", tmp_path)) == [(SPK["key"], "device_error", "D1")]
    # and the live path does not forget room-a's mark after a maintenance pass and a restart
    for db in stores(tmp_path, "restart.sqlite"):
        rows = live("\n".join(lines) + "\n", db, restart=True)
        assert [(r["device"], r["rule"]) for r in rows] == [(SPK["key"], "D1")]


def test_an_agent_three_days_behind_is_judged_on_its_own_clock(tmp_path: Path) -> None:
    lines: list[str] = []
    now = Agent("room-now", "bootroomN001", lines).started()
    late = Agent("room-late", "bootroomL001", lines, base=T0 - timedelta(days=3)).started()
    late.detach(30, CAM)
    late.attach(34, CAM)  # quick idle replug on its own clock: quiet
    now.telemetry(3 * DAY, [CAM["key"], SPK["key"]])  # the other agent is three days later
    late.detach(40, SPK, in_use=True)  # a handling mark...
    late.attach(41, SPK)
    now.telemetry(3 * DAY + 60, [CAM["key"], SPK["key"]])
    late.error(60, SPK, "audio.stream_error")  # ...relied on 20 min later
    late.detach(70, CAM)  # gone, idle: M2 only once room-late's own clock passes 80
    late.telemetry(79, [SPK["key"]])
    text = "\n".join(lines) + "\n"
    assert brief(incidents(text, tmp_path / "a")) == [(SPK["key"], "device_error", "D1")]
    late.telemetry(81, [SPK["key"]])
    text = "\n".join(lines) + "\n"
    assert sorted(brief(incidents(text, tmp_path / "b"))) == sorted(
        [(SPK["key"], "device_error", "D1"), (CAM["key"], "device_missing", "M2")])
    for db in stores(tmp_path, "restart.sqlite"):
        rows = live(text, db, restart=True)
        assert sorted((r["device"], r["rule"]) for r in rows) == sorted([(SPK["key"], "D1"), (CAM["key"], "M2")])


def test_boots_follow_the_prev_boot_chain_when_the_clock_resets_at_every_start(tmp_path: Path) -> None:
    a = Agent(boot="bootfirst0001").started()  # clock correct
    a.event("agent.stopping", 60)
    # a dead CMOS battery: the next boot's clock starts two days earlier than the first one's
    b = a.restart("bootsecond001", base=T0 - timedelta(days=2)).started(at=0, devices=[SPK])
    b.telemetry(11, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["device"], inc["rule"]) == (CAM["key"], "M2")  # absent after the (later) restart
    assert inc["evidence"][0]["boot"] == "bootsecond001"


def test_a_will_is_the_last_word_of_its_boot_and_applied_once(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.telemetry(35, [SPK["key"]])
    a.will()
    a.will()  # the broker delivers it again
    b = a.restart("bootafter0001").started(at=38, devices=[SPK, CAM])  # back in the first inventory
    b.telemetry(60, [SPK["key"], CAM["key"]])
    assert incidents(a.text(), tmp_path) == []
    for db in stores(tmp_path, "will.sqlite"):
        live(a.text(), db)
        store = open_store(db)
        wills = store.query("SELECT ts FROM evidence WHERE seq = -1")
        store.close()
        assert wills == [{"ts": ts(35)}]  # once, stamped at its agent's clock as it stood


def test_a_dashboard_report_stands_at_its_time_and_ends_no_boot(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)  # pending: must not be carried or dropped by the report
    a.dashboard_report(31, SPK)  # made at the dashboard, on this agent's clock
    a.attach(33, CAM)
    a.error(40, SPK, "audio.stream_error")
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["device"], inc["rule"]) == (SPK["key"], "D1")
    assert [(e["boot"], e["type"]) for e in inc["evidence"]] == [
        ("dashboard-0123456789ab", "handling.reported"), (a.boot, "device.error")]


def test_a_dashboard_report_dated_after_the_error_is_not_its_mark(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(40, SPK, "audio.stream_error")
    a.dashboard_report(41, SPK)
    [inc] = incidents(a.text(), tmp_path)
    assert inc["rule"] == "D2"


def test_info_codes_are_no_error_for_a_quick_idle_replug_or_u1(tmp_path: Path) -> None:
    a = Agent().started()
    for n in range(3):
        a.detach(30 + 2 * n, CAM)
        a.error(30 + 2 * n + 0.2, CAM, "usb.reset")
        a.attach(30 + 2 * n + 0.5, CAM)
    a.telemetry(50, [CAM["key"], SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["kind"], inc["rule"], inc["opened_at"]) == ("device_unstable", "U1", ts(30))
    assert inc["resolved_at"] == ts(44)  # the last detach + 10 min
    assert [e["type"] for e in inc["evidence"]] == ["device.detached"] * 3


def test_a_detach_during_sleep_is_not_a_u1_cycle(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.attach(30.5, CAM)
    _sleep(a, 31)
    a.detach(31.2, CAM)
    a.event("host.resumed", 32)
    a.attach(32.5, CAM)
    a.detach(33, CAM)
    a.attach(33.5, CAM)
    a.telemetry(60, [CAM["key"], SPK["key"]])
    assert incidents(a.text(), tmp_path) == []


def test_trouble_that_opened_nothing_does_not_make_another_incident_host_wide(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM, in_use=True)  # back within 10 min: opens nothing
    a.attach(33, CAM)
    a.error(30.5, SPK, "audio.stream_error")  # within 60 s of that detach
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["device"], inc["rule"]) == (SPK["key"], "D2")


def test_a_missing_device_back_within_ten_minutes_does_not_reopen_the_resolved_incident(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.attach(60, CAM)  # missing 30 min: M2, resolved
    a.detach(120, CAM)
    a.attach(125, CAM)  # gone 5 min: would open nothing on its own
    a.telemetry(200, [CAM["key"], SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["rule"], inc["resolved_at"]) == ("M2", ts(60))
    assert [e["seq"] for e in inc["evidence"]] == [4, 5]


def test_m1_or_m2_on_a_reopened_incident_follows_its_latest_detach(tmp_path: Path) -> None:
    a = Agent().started()
    a.detach(30, CAM)
    a.attach(60, CAM)
    a.detach(120, CAM, in_use=True)
    a.telemetry(200, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["rule"], inc["resolved_at"]) == ("M1", None)


def test_replay_prints_the_policy_version(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    [inc] = replay(a.text())
    assert inc["policy"] == "1.1" and json.dumps(inc)


# ---------------------------------------------------------------- found by a second reading of the policy


def test_a_pc_whose_clock_reset_to_1970_is_judged_on_its_own_clock(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    a = Agent(base=datetime(1970, 1, 1, tzinfo=UTC)).started()
    a.error(30, CAM, "video.stream_error")
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["rule"], inc["opened_at"]) == ("D2", "1970-01-01T00:30:00.000Z")
    for db in stores(tmp_path, "restart.sqlite"):  # and a restarted collector still reads its evidence
        rows = live(a.text(), db, restart=True)
        assert [(r["rule"], r["status"], r["opened_at"]) for r in rows] == [("D2", "open", inc["opened_at"])]


def test_the_prev_boot_chain_holds_when_the_next_clock_resets_to_2000(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    a = Agent(boot="bootfirst0001").started()
    a.event("agent.stopping", 60)
    b = a.restart("bootsecond001", base=datetime(2000, 1, 1, tzinfo=UTC)).started(at=1, devices=[SPK])
    b.telemetry(12, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["device"], inc["rule"], inc["opened_at"]) == (CAM["key"], "M2", "2000-01-01T00:01:00.000Z")


def test_an_unwatched_window_pending_at_a_stop_is_carried_too(tmp_path: Path) -> None:
    a = Agent().started()
    _sleep(a, 60)
    a.detach(61, CAM)
    a.event("host.resumed", 62)
    a.event("agent.stopping", 65)  # before resume + 10 min
    b = a.restart("bootnext00001").started(at=100, devices=[CAM, SPK])  # back in the first inventory
    b.telemetry(130, [CAM["key"], SPK["key"]])
    assert incidents(a.text(), tmp_path / "a") == []
    # and an absence found at a start, still pending when that boot stops, waits for the next one
    c = Agent(boot="bootc0000001").started()
    c.event("agent.stopping", 10)
    d = c.restart("bootd0000001").started(at=20, devices=[SPK])
    d.event("agent.stopping", 25)
    e = d.restart("boote0000001").started(at=100, devices=[CAM, SPK])
    e.telemetry(130, [CAM["key"], SPK["key"]])
    assert incidents(c.text(), tmp_path / "b") == []


def test_telemetry_that_lists_nothing_present_still_dates_the_end_of_its_boot(tmp_path: Path) -> None:
    a = Agent().started(devices=[CAM])
    a.detach(30, CAM)
    a.telemetry(35, [])
    a.telemetry(41, [])  # the boot's own clock passes the window: it elapsed before the boot ended
    b = a.restart("bootnext00001").started(at=100, devices=[CAM])  # no stop, no will: a crash
    b.telemetry(130, [CAM["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["rule"], inc["opened_at"], inc["resolved_at"]) == ("M2", ts(30), ts(100))


def test_a_will_arriving_late_changes_nothing(tmp_path: Path) -> None:
    def capture(with_will: bool) -> str:
        a = Agent().started()
        a.detach(30, CAM)
        a.telemetry(35, [SPK["key"]])
        b = a.restart("bootnext00001").started(at=100, devices=[CAM, SPK])
        b.telemetry(130, [CAM["key"], SPK["key"]])
        if with_will:
            a.will()  # the broker delivers the crashed boot's will after the next start
        return a.text()

    assert incidents(capture(True), tmp_path / "a") == incidents(capture(False), tmp_path / "b") == []


def test_replay_orders_incidents_opened_together_by_their_first_evidence(tmp_path: Path) -> None:
    a = Agent().started()
    a.event("handling.reported", 29, CAM, context={"note": "jatuh"})
    a.detach(30, CAM)
    a.error(30, CAM, "video.stream_error")
    a.telemetry(45, [SPK["key"]])
    out = incidents(a.text(), tmp_path)
    assert [(i["kind"], i["rule"]) for i in out] == [("device_error", "D1"), ("device_missing", "M2")]


def test_no_absence_is_derived_without_an_agent_started(tmp_path: Path) -> None:
    a = Agent().started()
    a.event("agent.stopping", 10)
    b = a.restart("bootnext00001")
    b.inventory(20, [SPK])  # a boot whose agent.started never arrived
    b.telemetry(40, [SPK["key"]])
    assert incidents(a.text(), tmp_path) == []


# ---------------------------------------------------------------- found by a third reading


def _started_without_inventory(a: Agent, at: float) -> None:
    a.event("agent.started", at, context={"host_boot": ts(at - 3, a.base), "prev_boot": a.prev_boot})


def test_a_duplicate_of_any_message_is_applied_once_evidence_or_not(tmp_path: Path) -> None:
    from collector.replay import replay_stream

    a = Agent().started()
    a.telemetry(5, [])  # lists nothing present: no evidence, but still the message (agent, boot, seq)
    a.error(6, CAM, "video.stream_error", seq=a.seq)  # the same (agent, boot, seq): a duplicate, not applied
    a.telemetry(20, [CAM["key"], SPK["key"]])
    assert incidents(a.text(), tmp_path) == []
    assert replay_stream(io.StringIO(a.text())).duplicates == 1


def test_a_detach_seen_before_the_next_boots_first_inventory_is_judged_by_that_detach(tmp_path: Path) -> None:
    a = Agent().started()  # camera and speaker listed
    a.event("agent.stopping", 10)
    b = a.restart("bootnext00001")
    _started_without_inventory(b, 70)
    b.detach(73, CAM, in_use=True)  # seen going, pulled during a meeting
    b.inventory(75, [SPK])
    b.telemetry(90, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["rule"], inc["opened_at"]) == ("M1", ts(73))  # not an unwatched absence at the start
    assert [e["type"] for e in inc["evidence"]] == ["device.detached"]


def test_a_detach_seen_in_a_boot_without_inventory_is_judged_by_that_detach(tmp_path: Path) -> None:
    a = Agent().started()  # camera and speaker listed
    a.event("agent.stopping", 10)
    b = a.restart("bootb00000001")
    _started_without_inventory(b, 20)  # this boot never sends an inventory
    b.detach(25, CAM, in_use=True)
    b.event("agent.stopping", 26)  # its window is pending at the stop: carried to the next start
    c = b.restart("bootc00000001").started(at=60, devices=[SPK])
    c.telemetry(75, [SPK["key"]])
    [inc] = incidents(a.text(), tmp_path)
    assert (inc["rule"], inc["opened_at"]) == ("M1", ts(25))  # the detach's own in_use, not a derived one
    assert [(e["type"], e["boot"]) for e in inc["evidence"]] == [
        ("device.detached", "bootb00000001"), ("agent.started", "bootc00000001")]


def test_a_will_arriving_first_is_still_the_last_word_of_its_boot(tmp_path: Path) -> None:
    """Arrival order changes nothing: a will received before anything dated from its agent ends its boot."""
    def capture(will_first: bool) -> str:
        lines: list[str] = []
        a = Agent(lines=lines).started(devices=[CAM, SPK])
        a.detach(10, CAM)  # its window is pending when the boot ends (the will)
        a.will()
        will = lines.pop()
        b = a.restart("bootnext00001")
        b.telemetry(25, [])  # a later boot, seen only in telemetry that is no evidence: its clock passes 20
        return "\n".join(([will] if will_first else []) + lines + ([] if will_first else [will])) + "\n"

    assert incidents(capture(True), tmp_path / "a") == incidents(capture(False), tmp_path / "b") == []


def test_a_wills_receive_time_orders_no_boot(tmp_path: Path) -> None:
    """received_at is kept, but no rule reads it: a will stamped with it does not date its boot."""
    lines: list[str] = []
    y = Agent(boot="bootyyyy0001", lines=lines)
    will = y.will()
    lines[-1] = json.dumps({"topic": json.loads(lines[-1])["topic"], "payload": will,
                            "received_at": "2026-11-30T00:00:00.000Z"})
    x = Agent(boot="bootxxxx0001", lines=lines)
    x.error(120, CAM, "video.stream_error")
    y.event("device.recovered", 180, CAM, error={"code": "video.stream_error"})
    with_rx = replay("\n".join(lines) + "\n")
    lines[0] = json.dumps({"topic": json.loads(lines[0])["topic"], "payload": will})
    without = replay("\n".join(lines) + "\n")
    assert [(i["rule"], i["resolved_at"]) for i in with_rx] == [(i["rule"], i["resolved_at"]) for i in without] == [
        ("D2", ts(180))]


def test_a_null_or_empty_serial_means_no_serial_whatever_the_key(tmp_path: Path) -> None:
    """The port-move mark needs a serial: the device object's serial says, not an '@' in the key."""
    def rule(serial: str | None, key: str) -> str:
        dev = {**CAM, "serial": serial, "key": key}
        a = Agent().started(devices=[dev])
        a.detach(10, dev)
        a.attach(10.5, {**dev, "port": "3-9"})  # moved to another port: a mark, if it has a serial
        a.error(60, {**dev, "port": "3-9"}, "video.stream_error")
        [inc] = incidents(a.text(), tmp_path / key.replace(":", "_").replace("@", "_"))
        return str(inc["rule"])

    assert rule("SN@1", "046d:085e:SN@1") == "D1"
    assert rule("", "046d:085e:S1") == "D2"
