"""Housekeeping (roll-ups and retention) judges age by the collector's receive time, never by an
agent's clock: an agent whose clock is years off keeps its samples and has them rolled up. On both stores."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from collector.ingest import Collector, Inbound
from collector.store import Retention
from tests.builder import T0, Agent
from tests.web_helpers import open_test_store

NOW = T0.timestamp() + 3600  # the collector's wall clock in this test


def _feed(c: Collector, a: Agent, received_at: float) -> None:
    for line in a.lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), received_at)])
    a.lines.clear()


def test_samples_of_agents_with_wrong_clocks_are_rolled_up_and_kept_by_receive_time(tmp_path: Path,
                                                                                   store_db: str) -> None:
    store = open_test_store(store_db, tmp_path, Retention(raw_s=86400, five_min_s=7 * 86400, hourly_s=30 * 86400))
    c = Collector(store)
    right = Agent("room-right", "bootright001")
    behind = Agent("room-behind", "bootbehind01", base=T0 - timedelta(days=3 * 365))  # a dead CMOS battery
    ahead = Agent("room-ahead", "bootahead001", base=T0 + timedelta(days=5 * 365))
    for a in (right, behind, ahead):
        a.started()
        for m in range(0, 30, 1):
            a.telemetry(m, [])
        _feed(c, a, NOW - 1800)  # all received half an hour ago
    store.roll_up_and_expire(NOW)
    for agent in ("room-right", "room-behind", "room-ahead"):
        raw = store.query("SELECT count(*) AS n FROM host_samples WHERE agent = ?", (agent,))[0]["n"]
        rolled = store.query("SELECT sum(n) AS n FROM rollup WHERE res = 300 AND agent = ? AND metric = 'cpu_pct'",
                             (agent,))[0]["n"]
        assert (agent, raw, rolled) == (agent, 30, 30)  # kept, and rolled up once, whatever its clock
    # a day and a half later the raw samples are past retention (received > 1 day ago), the roll-ups stay
    store.roll_up_and_expire(NOW + 1.5 * 86400)
    for agent in ("room-right", "room-behind", "room-ahead"):
        assert store.query("SELECT count(*) AS n FROM host_samples WHERE agent = ?", (agent,))[0]["n"] == 0
        assert store.query("SELECT count(*) AS n FROM rollup WHERE res = 300 AND agent = ?", (agent,))[0]["n"] > 0
    # and the five-minute roll-ups go when they were received more than a week ago, not by bucket
    store.roll_up_and_expire(NOW + 8 * 86400)
    assert store.query("SELECT count(*) AS n FROM rollup WHERE res = 300")[0]["n"] == 0
    assert store.query("SELECT count(*) AS n FROM rollup WHERE res = 3600")[0]["n"] > 0
    store.close()


def test_each_agent_clock_and_offset_are_its_own(tmp_path: Path, store_db: str) -> None:
    c = Collector(open_test_store(store_db, tmp_path))
    right = Agent("room-right", "bootright001").started()
    ahead = Agent("room-ahead", "bootahead001", base=T0 + timedelta(hours=3)).started()
    received = T0.timestamp() + 2.0
    _feed(c, right, received)
    _feed(c, ahead, received)
    rows = {r["agent"]: r for r in c.store.query("SELECT agent, clock, clock_offset_s FROM agents")}
    assert rows["room-right"]["clock_offset_s"] == 2.0
    assert rows["room-ahead"]["clock_offset_s"] == -3 * 3600 + 2.0
    assert rows["room-ahead"]["clock"] > rows["room-right"]["clock"]
    assert c.classifier is not None and c.classifier.clocks["room-right"] == T0.timestamp()
    c.store.close()

