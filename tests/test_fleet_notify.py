"""Fleet notifications against real servers (aiosmtpd for mail, a local HTTP webhook): a room PC offline
longer than offline_after_s in working hours, and a clock more than 2 minutes off, are announced once
when they start and once when they clear, never again on a retry or after a restart; a PC whose broker
account was disabled is withdrawn, not announced as offline. The agents' messages go through the real
ingest (Collector on each store, a SQLite file and a PostgreSQL database), with the time they arrive chosen by
the test."""

from __future__ import annotations

import email
import email.policy
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from collector.fleet_notify import FleetWatch
from collector.ingest import Collector, Inbound
from collector.notify import Notifier, NotifyConfig
from collector.registry import load_toml
from collector.store import Store
from common.config import ConfigError
from common.protocol import ts_seconds
from tests.builder import T0, Agent, Hooks
from tests.procs import wait_until
from tests.web_helpers import open_test_store

REGISTRY = """
[[units]]
id = "setjen"
name = "Sekretariat Jenderal"
pic = { name = "Budi", email = "budi@setjen.example", phone = "0812" }
rooms = [{ id = "r1", name = "Ruang Sidang", agent = "room-1" }]
"""
MONDAY_8 = T0.timestamp()  # 2026-11-30 01:00 UTC: Monday 08:00 WIB
HOUR = 3600.0


def feed(c: Collector, a: Agent, skew_s: float = 0.0) -> None:
    """Deliver the agent's pending lines as if they arrived ``skew_s`` after their ts (the clock offset)."""
    for line in a.lines:
        rec = json.loads(line)
        ts = rec["payload"].get("ts")
        rx = (ts_seconds(ts) if ts else MONDAY_8) + skew_s
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), rx)])
    a.lines.clear()
    c.tick()


@pytest.fixture
def collector(tmp_path: Path, store_db: str) -> Iterator[Collector]:
    store = open_test_store(store_db, tmp_path)
    reg = tmp_path / "registry.toml"
    reg.write_text(REGISTRY)
    load_toml(store, str(reg))
    yield Collector(store)
    store.close()


def watch(c: Collector, smtp_port: int, hook: str, **kw: Any) -> tuple[Notifier, FleetWatch]:
    cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp_port, central_it=["pusdatin@example.go.id"],
                       webhook_url=hook, delay_s=kw.pop("delay_s", 0.0), dashboard_url="https://pantau.example/",
                       **kw)
    n = Notifier(c.store, cfg)
    return n, FleetWatch(c.store, n)


def parsed(env: Any) -> Any:
    return email.message_from_bytes(env.content, policy=email.policy.default)


def fleet_rows(store: Store) -> list[tuple[str, str, str, str]]:
    return [(r["incident"], r["status"], r["channel"], r["state"]) for r in store.query(
        "SELECT * FROM notify_delivery WHERE incident LIKE 'fleet:%' ORDER BY id")]


def test_offline_in_working_hours_is_announced_once_and_its_end_once(collector: Collector, smtp: Any,
                                                                     hooks: Hooks) -> None:
    mails, port = smtp
    hook = hooks.start("ok")
    n, w = watch(collector, port, hook)
    a = Agent("room-1", base=T0).started()
    feed(collector, a)
    a.will()  # the broker's copy of its will: offline
    feed(collector, a)
    assert w.check(MONDAY_8 + HOUR) == []  # an hour: under the 2 h of working time
    assert w.check(MONDAY_8 + 3 * HOUR) == [("offline_long", "room-1", "open")]
    assert n.deliver_due() == 2
    [env] = mails
    assert sorted(env.rcpt_tos) == ["budi@setjen.example", "pusdatin@example.go.id"]
    msg = parsed(env)
    assert msg["Subject"] == ("[Pantau] TERBUKA/OPEN: PC ruangan offline terlalu lama / room PC offline too long: "
                              "room-1 — Ruang Sidang, Sekretariat Jenderal")
    body = msg.get_content()
    assert "PC ruangan room-1 tidak terhubung sejak Senin 2026-11-30 08:00 WIB: 3 j dalam jam kerja" in body
    assert "melebihi batas 2 j" in body and "Alasan terakhir: lost" in body
    assert "Room PC room-1 has been offline since Mon 2026-11-30 08:00 WIB: 3 h of working time" in body
    assert "PIC: Budi, budi@setjen.example, 0812" in body
    assert "https://pantau.example/#/room/room-1" in body
    [hookbody] = hooks.bodies
    assert hookbody["fleet"]["condition"] == "offline_long" and hookbody["fleet"]["status"] == "open"
    assert hookbody["fleet"]["offline_working_s"] == 3 * 3600 and hookbody["registry"]["room"] == "r1"

    # still offline: nothing more, now or after a restart of the collector
    assert w.check(MONDAY_8 + 5 * HOUR) == []
    assert n.deliver_due() == 0
    n2, w2 = watch(collector, port, hook)
    assert w2.check(MONDAY_8 + 6 * HOUR) == []
    assert n2.deliver_due() == 0
    assert len(mails) == 1 and len(hooks.bodies) == 1

    # back: announced once
    b = a.restart("boot0002bbbb", base=T0 + timedelta(hours=6)).started()
    feed(collector, b)
    assert w2.check(MONDAY_8 + 6 * HOUR) == [("offline_long", "room-1", "resolved")]
    assert w2.check(MONDAY_8 + 6 * HOUR + 10) == []
    assert n2.deliver_due() == 2
    msg = parsed(mails[1])
    assert msg["Subject"].startswith("[Pantau] SELESAI/RESOLVED: PC ruangan terhubung lagi / room PC connected again")
    assert "Room PC room-1 is connected again (noted Mon 2026-11-30 14:00 WIB)." in msg.get_content()
    assert [s for *_, s in fleet_rows(collector.store)] == ["sent"] * 4
    assert len(mails) == 2 and len(hooks.bodies) == 2


def test_a_weekend_off_is_not_an_alarm(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    mails, port = smtp
    n, w = watch(collector, port, hooks.start("ok"))
    friday_16 = T0 - timedelta(days=3) + timedelta(hours=8)  # Friday 16:00 WIB
    a = Agent("room-1", base=friday_16).started()
    feed(collector, a)
    a.will()
    feed(collector, a)
    assert w.check(MONDAY_8 - 86400) == []  # Sunday: 1 h of working time (Friday 16:00-17:00)
    assert w.check(MONDAY_8 - 1800) == []  # Monday 07:30: 1 h 30 min
    assert w.check(MONDAY_8 + 60) == [("offline_long", "room-1", "open")]  # Monday 08:01: 2 h 1 min
    n.deliver_due()
    assert "2 j 1 m dalam jam kerja (Senin/Selasa/Rabu/Kamis/Jumat 07:00–17:00 WIB)" in parsed(mails[0]).get_content()


def test_a_clock_off_either_way_is_announced_and_cleared(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    mails, port = smtp
    n, w = watch(collector, port, hooks.start("ok"))
    n.start()  # the channel threads deliver (woken by the record)
    try:
        slow = Agent("room-1", base=T0).started()
        feed(collector, slow, skew_s=300)  # arrives 5 min after its ts: its clock is behind
        fast = Agent("room-2", base=T0).started()
        feed(collector, fast, skew_s=-185)  # ahead by 3 min 5 s
        ok = Agent("room-3", base=T0).started()
        feed(collector, ok, skew_s=110)  # within 2 min: nothing
        made = w.check(MONDAY_8 + 600)
        assert sorted(made) == [("clock_suspect", "room-1", "open"), ("clock_suspect", "room-2", "open")]
        wait_until(lambda: len(mails) == 2 and len(hooks.bodies) == 2, 10, what="two mails and two webhooks")
        texts = {parsed(m)["Subject"].split(": ")[-1]: parsed(m).get_content() for m in mails}
        assert "Jam PC ruangan room-1 terlambat 5 m dari jam collector (batas ±2 m)" in texts[
            "room-1 — Ruang Sidang, Sekretariat Jenderal"]
        assert "The clock of room PC room-1 is 5 min behind the collector's (limit ±2 min)" in texts[
            "room-1 — Ruang Sidang, Sekretariat Jenderal"]
        room2 = next(t for s, t in texts.items() if s.startswith("room-2"))
        assert "terlalu cepat 3 m 5 d" in room2 and "3 min 5 s ahead of the collector's" in room2
        assert {b["fleet"]["agent"]: round(b["fleet"]["clock_offset_s"]) for b in hooks.bodies} == {
            "room-1": 300, "room-2": -185}

        # room-1's clock is set right: the next messages arrive on time
        slow._msg("telemetry", "telemetry", 2, host={"cpu_pct": 1.0}, devices=[])
        feed(collector, slow, skew_s=0.5)
        assert w.check(MONDAY_8 + 700) == [("clock_suspect", "room-1", "resolved")]
        wait_until(lambda: len(mails) == 3, 10, what="the resolved mail")
        last = parsed(mails[2])
        assert last["Subject"].startswith("[Pantau] SELESAI/RESOLVED: jam PC ruangan tepat lagi")
        assert "is within ±2 min again (offset +0 s" in last.get_content()
        assert w.check(MONDAY_8 + 800) == []
        time.sleep(0.5)
        assert len(mails) == 3 and len(hooks.bodies) == 3
    finally:
        n.stop()


def test_a_change_must_hold_for_delay_s(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    mails, port = smtp
    n, w = watch(collector, port, hooks.start("ok"), delay_s=0.4)
    a = Agent("room-1", base=T0).started()
    feed(collector, a, skew_s=300)
    assert w.check(MONDAY_8) == []  # seen, not confirmed yet
    a._msg("telemetry", "telemetry", 1, host={"cpu_pct": 1.0}, devices=[])
    feed(collector, a, skew_s=0.2)  # back within the limit before the delay passed
    time.sleep(0.5)
    assert w.check(MONDAY_8) == []
    a._msg("telemetry", "telemetry", 12, host={"cpu_pct": 1.0}, devices=[])
    feed(collector, a, skew_s=400)  # 11 minutes later (the on-time message left the 10 min window): off again
    assert w.check(MONDAY_8) == []
    time.sleep(0.5)
    assert w.check(MONDAY_8) == [("clock_suspect", "room-1", "open")]
    n.deliver_due()
    assert len(mails) == 1


def test_a_failed_webhook_is_retried_after_a_restart_and_the_mail_is_not_resent(
        collector: Collector, smtp: Any, hooks: Hooks) -> None:
    mails, port = smtp
    n, w = watch(collector, port, hooks.start("silent"), total_timeout_s=0.5, retry_base_s=0.1)
    a = Agent("room-1", base=T0).started()
    feed(collector, a, skew_s=300)
    assert w.check(MONDAY_8) == [("clock_suspect", "room-1", "open")]
    assert n.deliver_due() == 1  # the mail; the webhook does not answer
    web = [r for r in fleet_rows(collector.store) if r[2] == "webhook"]
    assert web == [("fleet:clock_suspect:room-1", "open", "webhook", "pending")]
    # the collector restarts with the webhook working again: the same message goes, once
    n2, w2 = watch(collector, port, hooks.start("ok"))
    assert w2.check(MONDAY_8 + 60) == []
    time.sleep(0.2)
    assert n2.deliver_due() == 1
    assert n2.deliver_due() == 0
    assert len(mails) == 1 and len(hooks.bodies) == 1
    assert hooks.bodies[0]["fleet"]["at"] == "2026-11-30T01:00:00.000Z"
    assert [r[3] for r in fleet_rows(collector.store)] == ["sent", "sent"]


def test_a_disabled_account_is_withdrawn_not_announced_offline(collector: Collector, smtp: Any,
                                                               hooks: Hooks) -> None:
    mails, port = smtp
    n, w = watch(collector, port, hooks.start("ok"))
    for name in ("room-1", "room-2"):
        a = Agent(name, base=T0).started()
        feed(collector, a)
        a.will()
        feed(collector, a)
    with collector.store.tx() as db:  # room-2's account was disabled by the collector (its lease ended)
        db.execute("INSERT INTO agent_accounts (agent, unit, room, enrolled_at, disabled_at, disabled_by, "
                   "disabled_reason) VALUES ('room-2', 'setjen', 'r1', '2026-11-01T00:00:00Z', "
                   "'2026-11-30T00:00:00Z', 'collector', 'lease ended')")
    assert w.check(MONDAY_8 + 3 * HOUR) == [("offline_long", "room-1", "open")]
    assert n.deliver_due() == 2
    with collector.store.tx() as db:
        db.execute("INSERT INTO agent_accounts (agent, unit, room, enrolled_at, disabled_at, disabled_by, "
                   "disabled_reason) VALUES ('room-1', 'setjen', 'r1', '2026-11-01T00:00:00Z', "
                   "'2026-11-30T04:30:00Z', 'collector', 'lease ended')")
    assert w.check(MONDAY_8 + 4 * HOUR) == [("offline_long", "room-1", "withdrawn")]
    assert w.check(MONDAY_8 + 9 * HOUR) == []
    n.deliver_due()
    assert len(mails) == 2
    last = parsed(mails[1])
    assert last["Subject"].startswith("[Pantau] DIBATALKAN/WITHDRAWN: akun broker PC ruangan dinonaktifkan")
    assert "dinonaktifkan (alasan: lease ended)" in last.get_content()
    assert hooks.bodies[1]["fleet"]["disabled_reason"] == "lease ended"


def test_hostile_registry_names_stay_out_of_the_headers(tmp_path: Path, store_db: str, smtp: Any,
                                                         hooks: Hooks) -> None:
    store = open_test_store(store_db, tmp_path)
    (tmp_path / "r.toml").write_text(REGISTRY.replace('"Ruang Sidang"', '"Ruang\\r\\nBcc: thief@evil.example"')
                                     .replace("budi@setjen.example", "budi@setjen.example\\r\\nCc: x@evil.example"))
    load_toml(store, str(tmp_path / "r.toml"))
    c = Collector(store)
    mails, port = smtp
    n, w = watch(c, port, hooks.start("ok"))
    a = Agent("room-1", base=T0).started()
    feed(c, a, skew_s=-900)
    assert w.check(MONDAY_8) == [("clock_suspect", "room-1", "open")]
    assert n.deliver_due() == 2
    store.close()
    [env] = mails
    assert env.rcpt_tos == ["pusdatin@example.go.id"]  # the PIC's broken address is left out
    msg = parsed(env)
    assert msg["Bcc"] is None and msg["Cc"] is None
    assert "Ruang Bcc: thief@evil.example" in msg["Subject"]
    assert "15 min ahead of the collector's" in msg.get_content()


def test_notify_fleet_key() -> None:
    from collector.config import load

    assert load(env={}).notify_fleet is True
    assert load(env={"PANTAU_NOTIFY_FLEET": "no"}).notify_fleet is False
    with pytest.raises(ConfigError, match="PANTAU_NOTIFY_FLEET: 'maybe' must be true or false"):
        load(env={"PANTAU_NOTIFY_FLEET": "maybe"})


def test_the_service_runs_the_watch_when_it_notifies(tmp_path: Path) -> None:
    from collector import enroll
    from collector.config import load
    from collector.service import Service

    for on in (True, False):
        cfg = load(env={}, db=str(tmp_path / f"s{on}.sqlite"), webhook_url="http://127.0.0.1:9/hook",
                   http="127.0.0.1:0", notify_fleet=on)
        s = Service(cfg)
        try:
            assert isinstance(s.fleet_watch, FleetWatch) is on
        finally:
            s.store.close()
            enroll.configure(None)
    s = Service(load(env={}, db=str(tmp_path / "none.sqlite"), http="127.0.0.1:0"))  # no channel: no watch
    try:
        assert s.fleet_watch is None
    finally:
        s.store.close()
        enroll.configure(None)
