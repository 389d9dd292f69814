"""Handling reports handed to the running agent, the boot chain (prev_boot), one agent per state directory.

The end-to-end tests run real agent processes on the simulated bus against a real Mosquitto.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from agent.config import load
from agent.handoff import pending_reports, reports_dir, write_report
from agent.runner import Agent
from agent.spool import Outbox
from agent.state import AlreadyRunning, agent_running, read_prev_boot
from common.protocol import decode_message
from tests.builder import CAMERA, SPEAKER, write_bus
from tests.conftest import Mosquitto, free_port, run_cli
from tests.procs import Recorder, start_agent, wait_until

CAM_KEY = "046d:0843:A1B2C3D4"
ME = pwd.getpwuid(os.geteuid()).pw_name


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PANTAU_AGENT_ID": "room-1", "PANTAU_STATE_DIR": str(tmp_path / "state"),
            "PANTAU_USB_BACKEND": "simulated", "PANTAU_SIMULATED_BUS": str(tmp_path / "bus.json"),
            "PANTAU_POLL_S": "0.2", **extra}


def _report(tmp_path: Path, *args: str, **extra: str):  # type: ignore[no-untyped-def]
    return run_cli("agent.cli", "report-handling", *args, env=_env(tmp_path, **extra))


# ---------------------------------------------------------------- the command's input


@pytest.mark.parametrize(("args", "says"), [
    ([CAM_KEY, "--note", "   "], "--note must say what happened"),
    ([CAM_KEY, "--note", ""], "--note must say what happened"),
    (["camera", "--note", "jatuh"], "is not vid:pid:serial or vid:pid@port"),
    (["046D:0843:X", "--note", "jatuh"], "is not vid:pid:serial or vid:pid@port"),
    ([CAM_KEY, "--note", "x" * 501], "at most 500"),
])
def test_bad_input_is_refused_with_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    out = _report(tmp_path, *args)
    assert out.returncode == 2 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert pending_reports(str(tmp_path / "state")) == []


def test_unwritable_state_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = run_cli("agent.cli", "report-handling", CAM_KEY, "--note", "jatuh",
                  env=_env(tmp_path, PANTAU_STATE_DIR=str(tmp_path / "file" / "state")))
    assert out.returncode == 2 and "cannot queue the report" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_device_is_accepted_and_queued_without_an_agent(tmp_path: Path) -> None:
    out = _report(tmp_path, "0b0e:2456@1-9", "--note", "kabel ditarik, perangkat dibawa pulang")
    assert out.returncode == 0, out.stderr
    assert "no agent runs now" in out.stdout
    [rep] = pending_reports(str(tmp_path / "state"))
    assert (rep.key, rep.note, rep.reported_by) == ("0b0e:2456@1-9", "kabel ditarik, perangkat dibawa pulang", ME)


# ---------------------------------------------------------------- the agent's side, in process


def _cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    write_bus(tmp_path / "bus.json", CAMERA)
    return load(env={}, agent_id="room-1", state_dir=str(tmp_path / "state"), usb_backend="simulated",
                simulated_bus=str(tmp_path / "bus.json"), broker=f"mqtt://127.0.0.1:{free_port()}")


def _events(state: Path) -> list[dict]:  # type: ignore[type-arg]
    ob = Outbox(str(state / "outbox.sqlite"))
    try:
        return [decode_message(r.topic, r.payload).payload for r in ob.pending() if r.topic.endswith("/events")]
    finally:
        ob.close()


def test_a_report_already_in_the_outbox_is_not_sent_twice(tmp_path: Path) -> None:
    """A stop between queueing the event and removing the file: the next pick-up only cleans up."""
    cfg = _cfg(tmp_path)
    path = write_report(cfg.state_dir, CAM_KEY, "jatuh dari tripod")
    rid = os.path.basename(path)[:-5]
    agent = Agent(cfg)
    agent.take_reports()
    assert not os.path.exists(path) and [e["type"] for e in _events(tmp_path / "state")] == ["handling.reported"]
    agent.shutdown(flush_s=0)
    # the crash window, recreated: the event is queued (with its token) and the file is still there
    path2 = write_report(cfg.state_dir, CAM_KEY, "jatuh lagi")
    rid2 = os.path.basename(path2)[:-5]
    ob = Outbox(os.path.join(cfg.state_dir, "outbox.sqlite"))
    ob.put("pantau/v1/agents/room-1/events", b'{"stand-in": "the event queued before the crash"}', token=rid2)
    ob.close()
    agent = Agent(cfg)
    before = len(Outbox(os.path.join(cfg.state_dir, "outbox.sqlite")).pending())
    agent.take_reports()
    assert not os.path.exists(path2)
    assert len(Outbox(os.path.join(cfg.state_dir, "outbox.sqlite")).pending()) == before  # nothing new
    assert agent.outbox.token_state(rid2) is None and agent.outbox.token_state(rid) is None
    agent.shutdown(flush_s=0)


def test_a_file_that_is_not_a_report_is_set_aside(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    os.makedirs(reports_dir(cfg.state_dir))
    bad = Path(reports_dir(cfg.state_dir)) / "00000000000000000001-deadbeef.json"
    bad.write_bytes(b'{"key": "046d:0843:A1B2C3D4", "note": ""}')
    other = Path(reports_dir(cfg.state_dir)) / "00000000000000000002-deadbeef.json"
    other.write_bytes(b"\xff\xfe not json")
    assert pending_reports(cfg.state_dir) == []
    assert sorted(p.name for p in (bad.parent / "bad").iterdir()) == [bad.name, other.name]


def test_one_agent_per_state_directory_and_the_boot_chain(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = Agent(cfg)
    assert first.prev_boot is None and agent_running(cfg.state_dir) is True
    with pytest.raises(AlreadyRunning):
        Agent(cfg)
    first.shutdown(flush_s=0)
    assert agent_running(cfg.state_dir) is False
    second = Agent(cfg)
    assert second.prev_boot == first.boot and read_prev_boot(cfg.state_dir) == second.boot
    second.shutdown(flush_s=0)
    (tmp_path / "state" / "boot").write_text("not/a boot id\n")
    third = Agent(cfg)
    assert third.prev_boot is None  # a damaged file names nothing rather than something wrong
    third.shutdown(flush_s=0)


# ---------------------------------------------------------------- end to end, real processes and broker


def test_prev_boot_across_two_starts(tmp_path: Path, mosquitto: Mosquitto) -> None:
    write_bus(tmp_path / "bus.json", CAMERA)
    rec = Recorder(mosquitto.port)
    try:
        agent = start_agent(tmp_path, mosquitto.url)
        [s1] = wait_until(lambda: rec.events("agent.started"), 20, what="first agent.started")
        assert agent.term() == 0
        agent = start_agent(tmp_path, mosquitto.url)
        s2 = wait_until(lambda: [e for e in rec.events("agent.started") if e["boot"] != s1["boot"]], 20,
                        what="second agent.started")[0]
        assert agent.term() == 0
    finally:
        rec.close()
    assert s1["context"]["prev_boot"] is None
    assert s2["context"]["prev_boot"] == s1["boot"]
    assert (tmp_path / "state" / "boot").read_text().strip() == s2["boot"]


def test_report_to_a_running_agent_comes_before_the_error_that_follows(tmp_path: Path,
                                                                        mosquitto: Mosquitto) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    rec = Recorder(mosquitto.port)
    agent = start_agent(tmp_path, mosquitto.url)
    try:
        started = wait_until(lambda: rec.events("agent.started"), 20, what="agent.started")[0]
        out = _report(tmp_path, CAM_KEY, "--note", "jatuh dari tripod")
        assert out.returncode == 0, out.stderr
        assert "handed to the running agent" in out.stdout
        write_bus(bus, {**CAMERA, "errors": [{"code": "video.stream_error", "message": "stream stalled"}]}, SPEAKER)
        err = wait_until(lambda: rec.events("device.error"), 20, what="the device error")[0]
        second = start_agent(tmp_path, mosquitto.url, agent_id="room-1")  # same state directory
        assert second.p.wait(30) == 2 and "another agent is running" in second.log()
    finally:
        assert agent.term() == 0
        rec.close()
    [rep] = rec.events("handling.reported")
    assert rep["boot"] == started["boot"] == err["boot"]
    assert started["seq"] < rep["seq"] < err["seq"]
    assert rep["device"]["key"] == CAM_KEY and rep["device"]["port"] == CAMERA["port"]  # the agent's own view
    assert rep["context"]["note"] == "jatuh dari tripod"
    assert (rep["context"]["via"], rep["context"]["reported_by"]) == ("agent", ME)
    assert pending_reports(str(tmp_path / "state")) == []


def test_report_with_no_agent_goes_out_after_the_next_start(tmp_path: Path, mosquitto: Mosquitto) -> None:
    write_bus(tmp_path / "bus.json", CAMERA)
    for note in ("kabel ditarik", "jatuh"):
        out = _report(tmp_path, CAM_KEY, "--note", note)
        assert out.returncode == 0 and "after the next start" in out.stdout, out.stdout + out.stderr
    rec = Recorder(mosquitto.port)
    agent = start_agent(tmp_path, mosquitto.url)
    try:
        reps = wait_until(lambda: len(rec.events("handling.reported")) == 2 and rec.events("handling.reported"),
                          20, what="the queued reports")
        [started] = rec.events("agent.started")
    finally:
        assert agent.term() == 0
        rec.close()
    assert [r["context"]["note"] for r in reps] == ["kabel ditarik", "jatuh"]  # in the order they were made
    assert [r["seq"] for r in reps] == [started["seq"] + 1, started["seq"] + 2]
    assert {r["boot"] for r in reps} == {started["boot"]}
    assert all(r["device"]["port"] == CAMERA["port"] for r in reps)
    assert pending_reports(str(tmp_path / "state")) == []
    assert json.loads(json.dumps(reps[0]))["context"]["via"] == "agent"
