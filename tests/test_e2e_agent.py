"""The agent against a real Mosquitto: the first slice, outages, kill -9, the will, TLS, overflow.

Each test starts its own broker on a free 127.0.0.1 port and its own agent process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.builder import CAMERA, SPEAKER, broker_pki, write_bus
from tests.conftest import Mosquitto
from tests.procs import Recorder, db_rows, publisher, retained, start_agent, start_collector, wait_until

pytestmark = pytest.mark.broker
OUTAGE_S = float(os.environ.get("PANTAU_TEST_OUTAGE_S", "30"))
CAM_KEY = "046d:0843:A1B2C3D4"


def test_state_inventory_and_telemetry_land_in_sqlite(tmp_path: Path, mosquitto: Mosquitto) -> None:
    write_bus(tmp_path / "bus.json", CAMERA, SPEAKER)
    collector, http = start_collector(tmp_path, mosquitto.url)
    agent = start_agent(tmp_path, mosquitto.url)
    db = tmp_path / "collector.sqlite"
    try:
        wait_until(lambda: db_rows(db, "SELECT state FROM agents WHERE agent='room-1' AND state='online'"),
                   30, what="state online in the collector's SQLite file")
        inv = wait_until(lambda: db_rows(db, "SELECT inventory FROM agents WHERE inventory IS NOT NULL"), 10)
        assert sorted(d["key"] for d in json.loads(inv[0][0])) == [CAM_KEY, "0b0e:2456@1-3.1"]
        wait_until(lambda: db_rows(db, "SELECT 1 FROM host_samples WHERE cpu_pct IS NOT NULL"), 15,
                   what="telemetry")
        assert db_rows(db, "SELECT count(*) FROM device_samples WHERE device=? AND present=1", (CAM_KEY,))[0][0] >= 1
        from collector.store.sqlite import SqliteStore
        from tests.web_helpers import token_for

        store = SqliteStore(str(db))
        token = token_for(store, "e2e")
        store.close()
        req = urllib.request.Request(http + "/api/agents", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            [api] = json.load(r)
        assert (api["agent"], api["state"], api["labels"]) == ("room-1", "online", {"unit": "setjen", "room": "r1"})
        write_bus(tmp_path / "bus.json", SPEAKER)  # unplug the camera
        row = wait_until(lambda: db_rows(db, "SELECT payload FROM evidence WHERE type='device.detached'"), 15,
                         what="the detach in the store")
        assert json.loads(row[0][0])["device"]["key"] == CAM_KEY
    finally:
        assert agent.term() == 0, agent.log()
        collector.term()
    assert db_rows(db, "SELECT state, reason FROM agents") == [("offline", "shutdown")]
    assert db_rows(db, "SELECT count(*) FROM evidence WHERE type='agent.stopping'")[0][0] == 1


def _event_seqs(rec: Recorder, boot: str) -> list[int]:
    return [e["seq"] for e in rec.events() if e["boot"] == boot]


def test_broker_outage_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    rec = Recorder(mosquitto.port)
    agent = start_agent(tmp_path, mosquitto.url)
    try:
        started = wait_until(lambda: rec.events("agent.started"), 20, what="agent.started")
        boot = started[0]["boot"]
        mosquitto.stop()
        t_down = time.monotonic()
        stamps = []
        for _ in range(4):  # unplug and replug the camera several times while the broker is away
            write_bus(bus, SPEAKER)
            time.sleep(0.8)
            write_bus(bus, CAMERA, SPEAKER)
            time.sleep(0.8)
            stamps.append(time.time())
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
        mosquitto.start()
        wait_until(lambda: len(rec.events("device.attached")) >= 4, 60, what="the spooled events")
        time.sleep(1.0)
    finally:
        assert agent.term() == 0
    rec.close()
    evs = [e for e in rec.events() if e["boot"] == boot]
    seqs = [e["seq"] for e in evs]
    first = {}
    for e in evs:
        first.setdefault(e["seq"], e)
    types = [first[s]["type"] for s in sorted(first)]
    assert types[:1] == ["agent.started"]
    assert types.count("device.detached") == 4 and types.count("device.attached") == 4
    assert sorted(set(seqs)) == sorted(first)  # each event once after dedup by seq
    assert len(seqs) == len(set(seqs)), "a QoS 1 event was delivered twice"
    assert seqs == sorted(seqs), "the outbox drained out of order"
    detach_ts = [e["ts"] for e in evs if e["type"] == "device.detached"]
    # original timestamps: taken during the outage, not at delivery
    from common.protocol import ts_seconds

    assert all(ts_seconds(t) < stamps[-1] + 1 for t in detach_ts)


def test_kill_9_during_outage_then_restart(tmp_path: Path) -> None:
    # the recorder's persistent session also keeps QoS 0 telemetry while it reconnects after the outage, so
    # a telemetry message the agent sends the moment the broker is back cannot read as a lost seq
    mosquitto = Mosquitto(extra="queue_qos0_messages true\n").start()
    try:
        _kill_9_during_outage_then_restart(tmp_path, mosquitto)
    finally:
        mosquitto.close()


def _kill_9_during_outage_then_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    rec = Recorder(mosquitto.port)
    agent = start_agent(tmp_path, mosquitto.url)
    boot1 = wait_until(lambda: rec.events("agent.started"), 20)[0]["boot"]
    mosquitto.stop()
    write_bus(bus, SPEAKER)
    time.sleep(1.0)
    write_bus(bus, CAMERA, SPEAKER)
    time.sleep(1.0)
    agent.kill9()  # the PC loses power mid-outage
    agent2 = start_agent(tmp_path, mosquitto.url)
    try:
        time.sleep(2.0)
        write_bus(bus, SPEAKER)
        time.sleep(1.0)
        mosquitto.start()
        wait_until(lambda: len({e["boot"] for e in rec.events("agent.started")}) == 2, 60, what="second boot")
        wait_until(lambda: [e for e in rec.events("device.detached") if e["boot"] != boot1], 30)
        time.sleep(1.0)
    finally:
        agent2.term()
    rec.close()
    boots = {e["boot"] for e in rec.events()}
    assert len(boots) == 2
    for boot in boots:
        # every seq the boot spent is accounted for: events, state and inventory went through the outbox;
        # telemetry is only produced while connected
        allseq = sorted({m["seq"] for m in rec.of("events") + rec.of("state") + rec.of("inventory") +
                         rec.of("telemetry") if m.get("boot") == boot and "seq" in m})
        assert allseq == list(range(1, allseq[-1] + 1)), f"seq gap in boot {boot}: {allseq}"
    b1 = [e["type"] for e in rec.events() if e["boot"] == boot1]
    assert b1[0] == "agent.started" and "device.detached" in b1 and "device.attached" in b1


def test_will_on_kill_and_shutdown_on_clean_stop(tmp_path: Path, mosquitto: Mosquitto) -> None:
    write_bus(tmp_path / "bus.json", CAMERA)
    topic = "pantau/v1/agents/room-1/state"
    agent = start_agent(tmp_path, mosquitto.url, PANTAU_MQTT_VERSION="3.1.1")
    wait_until(lambda: (retained(mosquitto.port, topic) or {}).get("state") == "online", 20)
    agent.kill9()
    # the broker notices the dead TCP connection at once (socket closed) and publishes the will
    st = wait_until(lambda: (s := retained(mosquitto.port, topic)) and s.get("state") == "offline" and s, 60)
    assert st["reason"] == "lost" and "ts" not in st and "seq" not in st
    agent = start_agent(tmp_path, mosquitto.url)
    wait_until(lambda: (retained(mosquitto.port, topic) or {}).get("state") == "online", 20)
    assert agent.term() == 0
    st = retained(mosquitto.port, topic)
    assert st is not None and (st["state"], st["reason"]) == ("offline", "shutdown")


def test_tls_and_password_authentication(tmp_path: Path) -> None:
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("openssl and mosquitto_passwd are needed: run `make test`")
    m = Mosquitto()
    pki = m.dir / "pki"
    broker_pki(pki)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pki / "passwd"), "room-1", "s3cret"], check=True)
    os.chmod(pki / "passwd", 0o644)
    m.conf.write_text(
        f"listener {m.port} 127.0.0.1\nallow_anonymous false\npassword_file {pki}/passwd\n"
        f"cafile {pki}/ca.crt\ncertfile {pki}/broker.crt\nkeyfile {pki}/broker.key\nlog_dest stderr\n")
    m.start()
    write_bus(tmp_path / "bus.json", CAMERA)
    try:
        from agent.config import load
        from agent.runner import Agent

        base = dict(agent_id="room-1", broker=f"mqtts://localhost:{m.port}", ca_file=str(pki / "ca.crt"),
                    usb_backend="simulated", simulated_bus=str(tmp_path / "bus.json"), poll_s=0.2)
        good = Agent(load(env={}, password="s3cret", state_dir=str(tmp_path / "s1"), **base))
        good.session.start()
        wait_until(good.session.connected.is_set, 15, what="TLS + password connection")
        good.session.stop()
        bad = Agent(load(env={}, password="wrong", state_dir=str(tmp_path / "s2"), **base))
        bad.session.start()
        wait_until(lambda: bad.session.last_error, 15, what="a refusal")
        assert not bad.session.connected.is_set() and "refused" in (bad.session.last_error or "")
        bad.session.stop()
        wrong_host = Agent(load(env={}, password="s3cret", state_dir=str(tmp_path / "s3"),
                                **{**base, "broker": f"mqtts://127.0.0.2:{m.port}"}))
        wrong_host.session.start()
        time.sleep(2)  # 127.0.0.2 is not in the certificate: hostname verification must refuse
        assert not wrong_host.session.connected.is_set()
        wrong_host.session.stop()
    finally:
        m.close()


def test_full_outbox_drops_oldest_and_says_so(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bus = tmp_path / "bus.json"
    write_bus(bus, CAMERA, SPEAKER)
    # the recorder's persistent session exists before the outage, so nothing the agent sends the moment
    # the broker is back can slip past it
    rec = Recorder(mosquitto.port, client_id="test-recorder-outbox")
    pub = publisher(mosquitto.port)

    def probe() -> bool:  # a probe sent before the recorder's subscription went to nobody: send until one arrives
        pub.publish("pantau/v1/agents/probe/events", "{}", qos=1).wait_for_publish(10)
        return bool(rec.msgs)

    wait_until(probe, 10, interval=0.3, what="the recorder to subscribe")
    pub.loop_stop()
    pub.disconnect()
    rec.close()
    mosquitto.stop()
    agent = start_agent(tmp_path, mosquitto.url, PANTAU_SPOOL_MAX_EVENTS="5")
    from agent.spool import Outbox

    outbox = tmp_path / "state" / "outbox.sqlite"
    try:
        wait_until(lambda: db_rows(outbox, "SELECT 1 FROM outbox WHERE CAST(payload AS TEXT) LIKE '%agent.started%'"),
                   20, what="the agent to start")
        for _ in range(5):
            write_bus(bus, SPEAKER)
            time.sleep(0.5)
            write_bus(bus, CAMERA, SPEAKER)
            time.sleep(0.5)
        ob = Outbox(str(outbox))
        wait_until(lambda: ob.dropped_total == 6, 10, what="6 drops")  # agent.started + 10 plug events
        assert ob.depth == 5
        ob.close()
        rec = Recorder(mosquitto.start().port, client_id="test-recorder-outbox")
        state = wait_until(lambda: [s for s in rec.of("state") if s.get("state") == "online"], 30)
        assert state[-1]["spool_dropped"] == 6
        tel = wait_until(lambda: rec.of("telemetry"), 10)
        assert tel[-1]["spool"]["dropped_total"] == 6
        kept = wait_until(lambda: rec.events(), 10)
        assert [e["type"] for e in kept][-1] == "device.attached"  # the newest survive
        rec.close()
    finally:
        agent.term()
