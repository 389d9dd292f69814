"""Notifications against real servers: aiosmtpd for mail, local HTTP servers for webhooks (one that
answers, one that trickles a byte every 5 s, one that never answers). Incidents come from the real
pipeline (Collector on each store, a SQLite file and a PostgreSQL database, events from tests.builder)."""

from __future__ import annotations

import email
import email.policy
import threading
import time
from typing import Any

from collector.ingest import Collector
from collector.notify import Notifier, NotifyConfig, header_safe
from collector.store import Store
from tests.builder import Agent, Hooks, device, feed
from tests.procs import wait_until


def incident(collector: Collector, agent: str = "room-1", key: str = "046d:085e:CAM1") -> str:
    a = Agent(agent).started()
    a.error(30, device(key), "video.stream_error")
    feed(collector, a)
    rows = collector.store.query("SELECT id FROM incidents WHERE agent = ? AND device = ?", (agent, key))
    assert rows, "no incident opened"
    return str(rows[0]["id"])


def deliveries(store: Store, channel: str) -> list[dict[str, Any]]:
    return store.query("SELECT * FROM notify_delivery WHERE channel = ? ORDER BY id", (channel,))


def notifier(collector: Collector, smtp_port: int, hook: str, **kw: Any) -> Notifier:
    cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp_port, central_it=["pusdatin@example.go.id"],
                       webhook_url=hook, delay_s=0.2, **kw)
    n = Notifier(collector.store, cfg)
    collector.book.listeners.append(n.on_incident)
    return n


def test_a_trickling_webhook_stalls_neither_mail_nor_ingest(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    mails, port = smtp
    n = notifier(collector, port, hooks.start("trickle"), total_timeout_s=7.0, retry_base_s=30)
    n.start()
    try:
        t0 = time.monotonic()
        incident(collector, "room-1")
        incident(collector, "room-2", "046d:085e:CAM2")
        wait_until(lambda: len(mails) == 2, 5, what="both mails while the webhook trickles")
        assert time.monotonic() - t0 < 4
        wait_until(lambda: hooks.connections["trickle"] >= 1, 5)
        # ingest and classification go on while the webhook channel is stuck
        t1 = time.monotonic()
        incident(collector, "room-3", "046d:085e:CAM3")
        assert time.monotonic() - t1 < 1.0
        wait_until(lambda: len(mails) == 3, 5, what="the third mail")
        # the total deadline cuts the trickle (a byte every 5 s never trips a per-read timeout)
        failed = wait_until(lambda: [d for d in deliveries(collector.store, "webhook") if d["attempts"]], 12,
                            what="the first webhook attempt to end")
        assert failed[0]["last_error"].startswith("TimeoutError: no complete answer within 7 s")
        assert 6.5 < time.monotonic() - t0 < 11
        assert [d["state"] for d in deliveries(collector.store, "email")] == ["sent"] * 3
    finally:
        n.stop()


def test_a_webhook_that_never_answers_does_not_resend_the_mail(collector: Collector, smtp: Any,
                                                               hooks: Hooks) -> None:
    mails, port = smtp
    hook = hooks.start("silent")
    n = notifier(collector, port, hook, total_timeout_s=0.5, retry_base_s=0.2, retry_max_s=0.4)
    n.start()
    try:
        incident(collector)
        wait_until(lambda: hooks.connections["silent"] >= 4, 20, what="four webhook attempts")
        assert len(mails) == 1
    finally:
        n.stop()
    [mail] = deliveries(collector.store, "email")
    [web] = deliveries(collector.store, "webhook")
    assert (mail["state"], mail["attempts"]) == ("sent", 1)
    assert web["state"] == "pending" and web["attempts"] >= 3 and "TimeoutError" in web["last_error"]
    # a restarted collector takes the record up: the webhook is retried, the mail is not sent again
    seen = hooks.connections["silent"]
    n2 = notifier(collector, port, hook, total_timeout_s=0.5, retry_base_s=0.2, retry_max_s=0.4)
    n2.start()
    try:
        wait_until(lambda: hooks.connections["silent"] >= seen + 2, 20, what="retries after the restart")
        time.sleep(0.3)
        assert len(mails) == 1
    finally:
        n2.stop()


def test_crlf_in_a_device_key_cannot_break_or_add_headers(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    """Validation now refuses control characters in device keys; a row stored before it did (or any field
    that reaches a header) still cannot break or add mail headers."""
    mails, port = smtp
    n = notifier(collector, port, hooks.start("ok"))
    n.cfg.central_it.append("it2@example.go.id\r\nBcc: thief@evil.example")  # a bad address is left out
    iid = incident(collector)
    with collector.store.tx() as db:  # as an older collector could have stored it
        db.execute("UPDATE incidents SET device = ? WHERE id = ?",
                   ("046d:085e:CAM1\r\nBcc: thief@evil.example\r\nX-Evil: 1", iid))
    n.start()
    try:
        wait_until(lambda: mails and hooks.bodies, 10, what="mail and webhook")
        time.sleep(0.3)
    finally:
        n.stop()
    [env] = mails
    assert sorted(env.rcpt_tos) == ["budi@setjen.example", "pusdatin@example.go.id"]
    msg = email.message_from_bytes(env.content, policy=email.policy.default)
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert "CAM1 Bcc: thief@evil.example X-Evil: 1" in str(msg["Subject"])
    assert hooks.bodies[0]["incident"]["device"] == "046d:085e:CAM1\r\nBcc: thief@evil.example\r\nX-Evil: 1"
    assert [d["state"] for d in deliveries(collector.store, "email")] == ["sent"]
    assert iid == hooks.bodies[0]["incident"]["id"]


def test_the_listener_only_enqueues(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    _, port = smtp
    n = notifier(collector, port, hooks.start("ok"))
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with collector.store.lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    try:
        t0 = time.monotonic()
        n.on_incident("opened", {"id": "x", "status": "open", "cause": "device_fault", "decided_cause": None})
        assert time.monotonic() - t0 < 1.0  # the store is held 5 s: the listener returned without waiting for it
    finally:
        release.set()
        t.join()
    assert n.deliver_due() == 0  # not confirmed yet (delay), and "x" is no incident


def test_header_safe() -> None:
    assert header_safe("a\r\nBcc: b\tc\x00d\u2028e") == "a Bcc: b c d e"
    assert len(header_safe("x" * 5000)) == 900


def test_two_notifiers_on_one_store_send_each_delivery_once(collector: Collector, smtp: Any, hooks: Hooks) -> None:
    """Several collectors on one database: each records what it hears, only the one allowed (the classifying
    collector) delivers, so a delivery goes out once; when the lead moves, the other delivers what is due."""
    mails, port = smtp
    leader = notifier(collector, port, hooks.start("ok"))
    other = Notifier(collector.store, leader.cfg)
    lead = {"who": leader}
    leader.may_deliver = lambda: lead["who"] is leader
    other.may_deliver = lambda: lead["who"] is other
    leader.start()
    other.start()
    try:
        incident(collector, "room-1")
        wait_until(lambda: len(mails) == 1, 5, what="the mail")
        time.sleep(1.0)
        assert len(mails) == 1 and len(hooks.bodies) == 1
        assert (leader.sent, other.sent) == (2, 0)  # mail and webhook, both by the leader
        lead["who"] = other  # the leader died: the other collector takes over, and delivers what comes next
        incident(collector, "room-2", "046d:085e:CAM2")
        wait_until(lambda: len(mails) == 2, 5, what="the second mail, from the other notifier")
        time.sleep(1.0)
        assert len(mails) == 2 and len(hooks.bodies) == 2
        assert (leader.sent, other.sent) == (2, 2)
        assert [d["state"] for d in deliveries(collector.store, "email")] == ["sent", "sent"]
    finally:
        leader.stop()
        other.stop()
