"""A handling report, then an error, in one running agent: handling damage (D1), never a device fault.

Real Mosquitto, a real agent on the simulated bus, ``pantau-collector serve`` and its HTTP API. The
collector's "0–120 s after agent.started" window is shortened to 1 s by configuration, so an error a few
seconds after the agent starts is not host-wide and D1 can be seen without waiting two minutes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from tests.builder import CAMERA, SPEAKER, write_bus
from tests.conftest import Mosquitto, run_cli
from tests.procs import start_agent, start_collector, wait_until

CAM_KEY = "046d:0843:A1B2C3D4"


def _rows(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def _config(tmp: Path, prefix: str = "pantau") -> str:
    path = tmp / "collector.toml"
    path.write_text(f'prefix = "{prefix}"\n[windows]\nafter_start_s = 1\n')
    return str(path)


def _break_camera(bus: Path) -> None:
    write_bus(bus, {**CAMERA, "errors": [{"code": "video.stream_error", "message": "uvcvideo: stream stalled"}]},
              SPEAKER)


def test_report_through_the_cli_then_an_error_is_d1(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "collector.sqlite"
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    collector, _ = start_collector(tmp_path, mosquitto.url, PANTAU_COLLECTOR_CONFIG=_config(tmp_path))
    wait_until(lambda: "subscribed" in collector.log(), 20, what="the collector to subscribe")
    agent = start_agent(tmp_path, mosquitto.url)
    try:
        wait_until(lambda: _rows(db, "SELECT 1 FROM evidence WHERE type = 'agent.started'"), 30, what="the agent")
        time.sleep(1.5)
        env = {"PANTAU_AGENT_ID": "room-1", "PANTAU_STATE_DIR": str(tmp_path / "state"),
               "PANTAU_USB_BACKEND": "simulated", "PANTAU_SIMULATED_BUS": str(bus)}
        out = run_cli("agent.cli", "report-handling", CAM_KEY, "--note", "kamera jatuh dari tripod",
                      env={**__import__("os").environ, **env})
        assert out.returncode == 0, out.stderr
        wait_until(lambda: _rows(db, "SELECT 1 FROM evidence WHERE type = 'handling.reported'"), 20,
                   what="the report")
        _break_camera(bus)
        row = wait_until(lambda: _rows(db, "SELECT rule, cause, responsible, evidence FROM incidents"), 30,
                         what="the incident")
        rule, cause, responsible, evidence = row[0]
        assert (rule, cause, responsible) == ("D1", "handling_damage", "unit")
        boots = {e["boot"] for e in json.loads(evidence)}
        assert len(boots) == 1  # the report is the running agent's own event, in its own boot
    finally:
        agent.term()
        collector.term()


def test_report_at_the_dashboard_under_another_prefix_then_an_error_is_d1(tmp_path: Path,
                                                                       mosquitto: Mosquitto) -> None:
    from collector.store.sqlite import SqliteStore
    from tests.web_helpers import Browser, add_user

    db = tmp_path / "collector.sqlite"
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    collector, http = start_collector(tmp_path, mosquitto.url, PANTAU_COLLECTOR_CONFIG=_config(tmp_path, "acme"))
    wait_until(lambda: "subscribed" in collector.log(), 20, what="the collector to subscribe")
    agent = start_agent(tmp_path, mosquitto.url, PANTAU_PREFIX="acme")
    try:
        wait_until(lambda: _rows(db, "SELECT 1 FROM agents WHERE inventory IS NOT NULL"), 30, what="the agent")
        store = SqliteStore(str(db))
        add_user(store, "ani", "operator")
        store.close()
        time.sleep(1.5)
        browser = Browser(http, "ani")
        r = browser.post("/api/handling", {"agent": "room-1", "device": CAM_KEY, "note": "kabel tertarik"})
        assert r.status_code == 200, r.text
        assert _rows(db, "SELECT count(*) FROM dead_letter") == [(0,)]
        [(boot, topic_ok)] = _rows(db, "SELECT boot, 1 FROM evidence WHERE type = 'handling.reported'")
        assert boot.startswith("dashboard-") and topic_ok
        time.sleep(1.2)  # the report and the error are apart on the agent's clock
        _break_camera(bus)
        row = wait_until(lambda: _rows(db, "SELECT rule, evidence FROM incidents"), 30, what="the incident")
        rule, evidence = row[0]
        assert rule == "D1" and "handling.reported" in evidence
    finally:
        agent.term()
        collector.term()


def test_an_agent_cannot_send_a_dashboard_report_over_mqtt(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from tests.procs import publisher

    db = tmp_path / "collector.sqlite"
    collector, _ = start_collector(tmp_path, mosquitto.url)
    pub = publisher(mosquitto.port)
    try:
        wait_until(lambda: "subscribed" in collector.log(), 20, what="the collector to subscribe")
        forged = {"v": 1, "agent": "room-1", "boot": "dashboard-0123456789ab", "seq": 1,
                  "ts": "2026-11-30T01:10:00.000Z", "kind": "event", "type": "handling.reported",
                  "device": {"key": CAM_KEY}, "context": {"note": "dijatuhkan", "reported_by": "budi",
                                                          "via": "dashboard"}}
        pub.publish("pantau/v1/agents/room-1/events", json.dumps(forged), qos=1).wait_for_publish(10)
        row = wait_until(lambda: _rows(db, "SELECT reason, detail FROM dead_letter"), 20, what="the dead letter")
        assert row[0][0] == "bad_boot" and "collector" in row[0][1]
        assert _rows(db, "SELECT count(*) FROM evidence") == [(0,)]
    finally:
        pub.loop_stop()
        pub.disconnect()
        collector.term()
