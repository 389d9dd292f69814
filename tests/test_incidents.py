"""Incident life beyond classification: registry, override, acknowledgement, reopen, the audit
chain and its tamper detection, notifications to a real SMTP server and webhook, the API,
and the replay command. What touches the store runs on both stores (a SQLite file and a PostgreSQL database)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from collector import audit
from collector.ingest import Collector
from collector.notify import Notifier, NotifyConfig
from collector.registry import RegistryError, load_toml, lookup
from collector.store.sqlite import SqliteStore
from tests.builder import CAM, REGISTRY, SPK, Agent, feed
from tests.conftest import EXAMPLES, ROOT, free_port, run_cli
from tests.web_helpers import open_test_store


def test_registry_names_unit_room_and_pic(collector: Collector) -> None:
    info = lookup(collector.store, CAM["key"], "room-1")
    assert (info["registered"], info["unit"], info["room_name"], info["pic"]["email"]) == (
        True, "setjen", "Ruang Sidang", "budi@setjen.example")
    other = lookup(collector.store, "dead:beef:X", "room-9")
    assert other["registered"] is False and other["unit"] is None


def test_registry_rejects_bad_files(tmp_path: Path, store_db: str) -> None:
    store = open_test_store(store_db, tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[units]]\nname = 'no id'\n")
    with pytest.raises(RegistryError, match=r"units\[0\]\.id"):
        load_toml(store, str(bad))
    bad.write_text("units = [")
    with pytest.raises(RegistryError, match="not valid TOML"):
        load_toml(store, str(bad))


def test_override_keeps_both_causes_and_audits(collector: Collector) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    feed(collector, a)
    [row] = collector.store.query("SELECT * FROM incidents")
    assert row["cause"] == "device_fault"
    out = collector.book.override(row["id"], "handling_damage", "kabel tertarik, foto terlampir", "pusdatin-ani",
                                  "2026-11-30T02:00:00.000Z")
    assert (out["cause"], out["decided_cause"], out["decided_responsible"]) == (
        "device_fault", "handling_damage", "unit")
    # later evidence revises the computed cause; the decision stands beside it
    a.error(31, SPK, "audio.stream_error")
    feed(collector, a, len(a.lines) - 1)
    row = collector.book.get(row["id"])
    assert row is not None and (row["cause"], row["decided_cause"]) == ("host_issue", "handling_damage")
    actions = [r["action"] for r in collector.store.query("SELECT action FROM audit WHERE incident=? ORDER BY id",
                                                          (row["id"],))]
    assert actions == ["opened", "overridden", "revised"]


def test_reopen_is_the_same_incident(collector: Collector) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    n = feed(collector, a)
    a.event("device.recovered", 40, CAM, error={"code": "video.stream_error"})
    n = feed(collector, a, n)
    [row] = collector.store.query("SELECT * FROM incidents")
    assert row["status"] == "resolved"
    a.error(60 * 24 * 3, CAM, "video.stream_error")
    feed(collector, a, n)
    [again] = collector.store.query("SELECT * FROM incidents")
    assert again["id"] == row["id"] and again["status"] == "open"
    assert [r["action"] for r in collector.store.query("SELECT action FROM audit ORDER BY id")] == [
        "opened", "resolved", "reopened"]


def test_audit_chain_detects_tampering(collector: Collector, tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    a.event("device.recovered", 40, CAM, error={"code": "video.stream_error"})
    a.error(50, SPK, "usb.over_current")
    feed(collector, a)
    db = collector.store.db
    n, broken, _ = audit.verify(db)
    assert n == 3 and broken is None  # opened, resolved, opened
    env = {**os.environ, "PANTAU_DB": collector.store.path,
           "PANTAU_AUDIT_KEY_FILE": audit.key_file_for(collector.store.path)}
    ok = run_cli("collector.cli", "audit", "verify", env=env)
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    db.execute("UPDATE audit SET detail = '{\"cause\":\"handling_damage\"}' WHERE id = 2")
    n, broken, why = audit.verify(db)
    assert broken == 2 and "altered" in why
    bad = run_cli("collector.cli", "audit", "verify", env=env)
    assert bad.returncode == 1 and "entry 2" in bad.stdout
    db.execute("DELETE FROM audit WHERE id = 3")  # (outside any transaction: committed at once)
    assert audit.verify(db)[1] == 2  # still the first broken one


# ---------------------------------------------------------------- notifications


class Inbox:
    def __init__(self) -> None:
        self.mails: list[Any] = []
        self.hooks: list[dict[str, Any]] = []


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int, str]]:
    from aiosmtpd.controller import Controller

    box = Inbox()

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            box.mails.append(envelope)
            return "250 OK"

    smtp_port = free_port()
    ctl = Controller(Handler(), hostname="127.0.0.1", port=smtp_port)
    ctl.start()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            box.hooks.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield box, smtp_port, f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    httpd.shutdown()
    httpd.server_close()
    ctl.stop()


def test_notifications_reach_smtp_and_webhook_once_per_state(collector: Collector, inbox) -> None:  # type: ignore[no-untyped-def]
    box, smtp_port, hook = inbox
    n = Notifier(collector.store, NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp_port,
                                               central_it=["pusdatin@example.go.id"], webhook_url=hook,
                                               delay_s=0.3))
    collector.book.listeners.append(n.on_incident)
    n.start()
    try:
        a = Agent().started()
        a.error(30, CAM, "video.stream_error")
        a.error(30.2, CAM, "video.stream_error")  # more evidence: not a new message
        k = feed(collector, a)
        deadline = time.monotonic() + 10
        while len(box.hooks) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)
        assert len(box.mails) == 1 and len(box.hooks) == 1
        mail = box.mails[0]
        assert sorted(mail.rcpt_tos) == ["budi@setjen.example", "pusdatin@example.go.id"]
        assert b"Sekretariat Jenderal" in mail.content and b"kerusakan perangkat" in mail.content
        hookmsg = box.hooks[0]
        assert hookmsg["incident"]["cause"] == "device_fault" and hookmsg["registry"]["unit"] == "setjen"
        assert len(hookmsg["incident"]["evidence"]) == 2
        # flapping: recovered and failing again inside the confirmation delay says nothing
        a.event("device.recovered", 31, CAM, error={"code": "video.stream_error"})
        k = feed(collector, a, k)
        a.error(31.5, CAM, "video.stream_error")
        k = feed(collector, a, k)
        time.sleep(1.0)
        assert len(box.hooks) == 1 and len(box.mails) == 1
        # a real state change is announced once
        a.event("device.recovered", 40, CAM, error={"code": "video.stream_error"})
        feed(collector, a, k)
        deadline = time.monotonic() + 10
        while len(box.hooks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(box.hooks) == 2 and box.hooks[1]["incident"]["status"] == "resolved"
        assert len(box.mails) == 2
    finally:
        n.stop()


def test_short_lived_incident_is_not_announced(collector: Collector, inbox) -> None:  # type: ignore[no-untyped-def]
    box, smtp_port, hook = inbox
    n = Notifier(collector.store, NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp_port, webhook_url=hook,
                                               delay_s=0.5))
    collector.book.listeners.append(n.on_incident)
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    a.event("device.recovered", 30.1, CAM, error={"code": "video.stream_error"})
    feed(collector, a)
    time.sleep(0.7)
    assert n.deliver_due() == 0 and box.hooks == [] and box.mails == []


# ---------------------------------------------------------------- the API


# ---------------------------------------------------------------- replay command


def test_replay_command_on_the_mosquitto_sub_form() -> None:
    out = run_cli("collector.cli", "replay", str(EXAMPLES / "speaker-pulled-in-meeting.capture"))
    assert out.returncode == 0, out.stderr
    [inc] = [json.loads(line) for line in out.stdout.splitlines()]
    assert (inc["rule"], inc["cause"], inc["responsible"]) == ("D1", "handling_damage", "unit")
    assert set(inc) == {"id", "kind", "agent", "device", "cause", "responsible", "confidence", "rule", "policy",
                        "opened_at", "resolved_at", "evidence", "summary"}
    assert inc["policy"] == "1.1"
    assert "73 lines" in out.stderr


def test_replay_counts_bad_lines_and_never_fails_on_them(tmp_path: Path) -> None:
    a = Agent().started()
    a.error(30, CAM, "video.stream_error")
    cap = tmp_path / "c.jsonl"
    cap.write_text(a.text() + "garbage\n\n" + a.lines[-1] + "\npantau/v1/agents/room-1/events {bad\n")
    out = run_cli("collector.cli", "replay", str(cap), "--lang", "en")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    assert "1 unparseable" in out.stderr and "1 duplicates" in out.stderr and "bad_json=1" in out.stderr
    assert "device fault" in json.loads(out.stdout)["summary"] or "failure" in json.loads(out.stdout)["summary"]
    missing = run_cli("collector.cli", "replay", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_replay_takes_hostile_and_windows_made_captures(tmp_path: Path) -> None:
    """Found by trying replay as a hostile user: none of this is fatal, and each form means the same."""
    a = Agent().started()
    a.error(0.5, CAM, "video.stream_error")
    good = a.lines[-1]
    deep = '{"topic": "pantau/v1/agents/room-1/events", "payload": ' + "[" * 100_000 + "]" * 100_000 + "}"
    deep_repeat = ('{"topic": "pantau/v1/agents/room-1/events", "x": {"a": 1, "a": 2}, "payload": '
                   + "[" * 100_000 + "]" * 100_000 + "}")  # a repeat first, then nesting too deep
    started = json.loads(a.lines[0])
    p = started["payload"]
    repeated = '{"topic": ' + json.dumps(started["topic"]) + ', "payload": {"seq": 99, ' + json.dumps(p)[1:] + "}"
    cap = tmp_path / "c.jsonl"
    cap.write_bytes(("\ufeff" + "\n".join(a.lines[:-1]) + "\n" + deep + "\n" + deep_repeat + "\n" + repeated + "\n"
                     + good.replace(", ", ",\r ") + "\r\n").encode())
    out = run_cli("collector.cli", "replay", str(cap))
    assert out.returncode == 0, out.stderr
    [inc] = [json.loads(line) for line in out.stdout.splitlines()]
    assert inc["rule"] == "H1"  # the BOM did not cost the agent.started (30 s after it: host-wide)
    assert "2 unparseable" in out.stderr and "duplicate_key=1" in out.stderr  # as in the other two forms
    mq = tmp_path / "m.txt"
    mq.write_text("  " + started["topic"] + " " + json.dumps(p) + "\n")
    assert "1 applied" in run_cli("collector.cli", "replay", str(mq)).stderr


def test_replay_output_into_a_closed_pipe_or_an_ascii_terminal(tmp_path: Path) -> None:
    import subprocess
    import sys

    lines: list[str] = []
    for n in range(300):
        a = Agent(f"ruang-{n:03d}", f"bootpipe{n:04d}", lines).started()
        a.error(30, {**CAM, "product": "Kamera Ü"}, "video.stream_error")
    cap = tmp_path / "many.jsonl"
    cap.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    out = run_cli("collector.cli", "replay", str(cap), env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert len([json.loads(x) for x in out.stdout.splitlines()]) == 300
    proc = subprocess.run(f"{sys.executable} -m collector.cli replay {cap} | head -1", shell=True, cwd=cap.parent,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "BrokenPipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_handling_reported_at_the_dashboard_marks_the_device(collector: Collector) -> None:
    a = Agent().started()
    a.telemetry(30, [CAM["key"], SPK["key"]])
    n = feed(collector, a)
    with pytest.raises(ValueError, match="note"):
        collector.report_handling("room-1", CAM["key"], "", "x")
    with pytest.raises(ValueError, match="no room PC"):
        collector.report_handling("nope", CAM["key"], "n", "x")
    ev = collector.report_handling("room-1", CAM["key"], "kamera jatuh dari tripod", "budi")
    assert ev["type"] == "handling.reported" and ev["device"]["port"] == CAM["port"] and ev["flag"] is None
    assert ev["boot"].startswith("dashboard-") and ev["seq"] == 1 and ev["context"]["via"] == "dashboard"
    # placed on the agent's own clock (its offset), the report comes before an error a second later
    # in the running boot: handling damage (D1), not a device fault
    from common.protocol import ts_seconds
    from tests.builder import T0

    minutes = (ts_seconds(ev["ts"]) - T0.timestamp()) / 60
    assert abs(minutes - 30) < 1  # the agent's clock stood at +30 min when the report was made
    a.error(minutes + 1 / 60, CAM, "video.stream_error")
    feed(collector, a, start=n)
    collector.tick()
    [row] = collector.store.query("SELECT rule, evidence FROM incidents")
    assert row["rule"] == "D1" and "handling.reported" in row["evidence"]


def test_report_handling_command_queues_for_the_agent(tmp_path: Path) -> None:
    env = {**os.environ, "PANTAU_AGENT_ID": "room-1", "PANTAU_STATE_DIR": str(tmp_path),
           "PANTAU_USB_BACKEND": "simulated", "PANTAU_SIMULATED_BUS": str(tmp_path / "none.json")}
    out = run_cli("agent.cli", "report-handling", CAM["key"], "--note", "kabel tertarik", env=env)
    assert out.returncode == 0, out.stderr
    # queued for the agent, which sends it as its own next event (tests/test_handoff.py runs that end to end)
    from agent.handoff import pending_reports

    [rep] = pending_reports(str(tmp_path))
    assert (rep.key, rep.note) == (CAM["key"], "kabel tertarik")


def test_schema_migrates_forward_and_refuses_newer(tmp_path: Path) -> None:
    from collector.store.sqlite import MIGRATIONS

    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")  # a file from the first release
    con.close()
    store = SqliteStore(str(db))
    assert store.schema_version() == len(MIGRATIONS)
    assert "summaries" in {r["name"] for r in store.query("PRAGMA table_info(incidents)")}
    store.db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store.close()
    with pytest.raises(RuntimeError, match="newer than this collector"):
        SqliteStore(str(db))


def test_a_report_naming_a_device_lent_to_another_room_is_flagged_and_never_a_d1_mark(tmp_path: Path,
                                                                                        store_db: str) -> None:
    """The registry lends CAM to room r1 (room-1's); a report about it from room-2 is recorded, flagged as
    a mismatch, and does not bill room-2's unit for room-2's own camera errors."""
    store = open_test_store(store_db, tmp_path)
    reg = tmp_path / "reg.toml"
    reg.write_text(REGISTRY.replace('rooms = [{ id = "r1", name = "Ruang Sidang", agent = "room-1" }]',
                                    'rooms = [{ id = "r1", name = "Ruang Sidang", agent = "room-1" },\n'
                                    '         { id = "r2", name = "Ruang Rapat", agent = "room-2" }]'))
    load_toml(store, str(reg))
    c = Collector(store)
    other = Agent("room-2", "bootroom2001").started()
    other.telemetry(30, [CAM["key"]])
    feed(c, other)
    ev = c.report_handling("room-2", CAM["key"], "kamera jatuh", "budi")
    assert ev["flag"] == "registry_mismatch"
    [row] = store.query("SELECT flag FROM evidence WHERE type = 'handling.reported'")
    assert row["flag"] == "registry_mismatch"
    from common.protocol import ts_seconds
    from tests.builder import T0

    other.error((ts_seconds(ev["ts"]) - T0.timestamp()) / 60 + 1 / 60, CAM, "video.stream_error")
    feed(c, other, start=len(other.lines) - 1)
    [inc] = store.query("SELECT rule, evidence FROM incidents")
    assert inc["rule"] == "D2" and "handling.reported" not in inc["evidence"]
    # the same report from the room the registry lends it to is a mark
    own = Agent("room-1", "bootroom1001").started()
    feed(c, own)
    assert c.report_handling("room-1", CAM["key"], "kamera jatuh", "budi")["flag"] is None
    store.close()


def test_a_device_whose_lease_ended_is_no_longer_expected_in_its_room(tmp_path: Path, store_db: str) -> None:
    """The registry's lease for CAM ended the day before: unplugging it opens no incident; the
    speakerphone, still lent, is missed as usual."""
    store = open_test_store(store_db, tmp_path)
    reg = tmp_path / "reg.toml"
    reg.write_text(REGISTRY.replace('lease_end = "2027-01-04"', 'lease_end = "2026-11-29"'))
    load_toml(store, str(reg))
    c = Collector(store)
    a = Agent().started()
    a.detach(30, CAM)
    a.detach(31, SPK)
    a.telemetry(45, [])
    a.event("device.usage", 45, SPK, context={"in_use": False, "users": [], "meeting": False})
    feed(c, a)
    rows = store.query("SELECT device, kind FROM incidents")
    assert rows == [{"device": SPK["key"], "kind": "device_missing"}]
    store.close()
