"""The agent with its state directory on a real filesystem that fills up (tests/fullfs.py; needs root).

While the disk refuses writes and the broker is away, events wait in memory; past the memory bound the
oldest non-detach events are dropped and counted; when the disk takes writes again everything held goes to
the outbox, and the broker gets every detach and the drop count.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.builder import CAMERA, SPEAKER, write_bus
from tests.conftest import Mosquitto
from tests.fullfs import fill, small_fs
from tests.procs import Recorder, start_agent, wait_until

CAM_KEY = "046d:0843:A1B2C3D4"


def test_full_disk_loses_no_detach_and_counts_what_it_dropped(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    with small_fs("1m") as fs:
        rec = Recorder(mosquitto.port)
        agent = start_agent(tmp_path, mosquitto.url, PANTAU_STATE_DIR=str(fs / "state"),
                            PANTAU_SPOOL_MEMORY_MAX_EVENTS="4")
        try:
            started = wait_until(lambda: rec.events("agent.started"), 20, what="agent.started")[0]
            mosquitto.stop()
            filler = fill(fs)
            for _ in range(5):  # five unplug/replug cycles while nothing can be written or sent
                write_bus(bus, SPEAKER)
                time.sleep(0.8)
                write_bus(bus, CAMERA, SPEAKER)
                time.sleep(0.8)
            assert agent.p.poll() is None, agent.log()
            assert "the disk refused a write" in agent.log()
            filler.unlink()
            wait_until(lambda: "the disk takes writes again" in agent.log(), 10, what="the disk retried")
            mosquitto.start()
            wait_until(lambda: [s for s in rec.of("state") if s.get("state") == "online"
                                and s.get("boot") == started["boot"] and s.get("spool_dropped")], 40,
                       what="the state after the reconnect")
            wait_until(lambda: len(rec.events("device.detached")) == 5, 20, what="every detach")
            tel = wait_until(lambda: [t for t in rec.of("telemetry") if t["spool"]["dropped_total"]], 10,
                             what="telemetry with the drops")
        finally:
            assert agent.term() == 0, agent.log()
            rec.close()
    evs = [e for e in rec.events() if e["boot"] == started["boot"]]
    kinds = [e["type"] for e in sorted({e["seq"]: e for e in evs}.values(), key=lambda e: e["seq"])]
    # every detach survived the full disk; 10 plug events against a memory bound of 4: the 5 detaches are
    # kept and so is the newest attach, the 4 older attaches were dropped, and said so
    assert kinds == ["agent.started"] + ["device.detached"] * 5 + ["device.attached", "agent.stopping"]
    [online] = [s for s in rec.of("state") if s.get("state") == "online" and s.get("spool_dropped")][-1:]
    assert online["spool_dropped"] == 4
    assert tel[-1]["spool"]["dropped_total"] == 4


def test_an_agent_starts_on_a_full_disk_and_reports(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A room PC whose disk filled while the agent was stopped: the agent starts (it stopped at start with
    a traceback: WAL's shared-memory file could not be made), and an unplug still reaches the broker."""
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    with small_fs("1m") as fs:
        rec = Recorder(mosquitto.port)
        try:
            first = start_agent(tmp_path, mosquitto.url, PANTAU_STATE_DIR=str(fs / "state"))
            wait_until(lambda: rec.events("agent.started"), 20, what="the first start")
            assert first.term() == 0, first.log()
            fill(fs)
            agent = start_agent(tmp_path, mosquitto.url, PANTAU_STATE_DIR=str(fs / "state"))
            try:
                wait_until(lambda: len(rec.events("agent.started")) == 2, 20, what="the start on a full disk")
                write_bus(bus, SPEAKER)
                wait_until(lambda: rec.events("device.detached"), 20, what="the unplug")
                assert agent.p.poll() is None, agent.log()
            finally:
                assert agent.term() == 0, agent.log()
        finally:
            rec.close()
