"""Nothing an agent sends, and no fault of the store, can stall, corrupt or silently lose the evidence.

The ingest path is fed real bytes into a real SQLite file; the full disk is a real one (a small tmpfs,
tests/fullfs.py) or SQLite's own page limit (``max_page_count``), which makes it answer SQLITE_FULL exactly
as a full disk does.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.ingest import Collector, Inbound
from collector.store.sqlite import SqliteStore, StoreError
from tests.builder import CAM, Agent, poison_messages, ts
from tests.fullfs import fill, small_fs

TOPIC = "pantau/v1/agents/{}/events"
POISON = poison_messages()


def honest(seq: int, agent: str = "honest-1", boot: str = "boothonest01") -> Inbound:
    p = {"v": 1, "agent": agent, "boot": boot, "seq": seq, "ts": ts(seq), "kind": "event", "type": "device.usage",
         "device": CAM, "context": {"in_use": seq % 2 == 0, "users": [], "meeting": False}}
    return Inbound(TOPIC.format(agent), json.dumps(p).encode(), time.time())


def stored(store: SqliteStore, agent: str = "honest-1") -> int:
    return int(store.query("SELECT count(*) AS n FROM evidence WHERE agent = ?", (agent,))[0]["n"])


@pytest.fixture
def collector(tmp_path: Path) -> Any:
    c = Collector(SqliteStore(str(tmp_path / "c.sqlite")))
    yield c
    c.store.close()


def test_each_poison_message_is_dead_lettered_and_the_batch_goes_on(collector: Collector) -> None:
    batch: list[Inbound] = []
    for n, (topic, raw) in enumerate(POISON, 1):
        batch.append(honest(n))
        batch.append(Inbound(topic, raw, time.time()))
    batch.append(honest(len(POISON) + 1))
    collector.ingest(batch)
    assert stored(collector.store) == len(POISON) + 1
    dead = [r["reason"] for r in collector.store.query("SELECT reason FROM dead_letter ORDER BY id")]
    assert dead == ["number_out_of_range", "bad_unicode", "number_out_of_range", "bad_enum", "ts_out_of_range",
                    "non_finite", "duplicate_key"]
    # what is served stays strict JSON
    for row in collector.store.query("SELECT * FROM agents"):
        json.dumps(row, allow_nan=False)
    # a restart on the same file is clean
    collector.store.close()
    again = Collector(SqliteStore(collector.store.path))
    again.ingest([honest(100)])
    assert stored(again.store) == len(POISON) + 2
    again.store.close()


def test_a_message_that_breaks_storage_is_dead_lettered_with_its_exception(collector: Collector) -> None:
    """Something validation lets through but storage refuses (here: a trigger standing for any such
    fault) costs that message only, never its batch."""
    with collector.store.tx() as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON evidence WHEN NEW.agent = 'evil' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the store'); END")
    evil = Agent("evil", "bootevil0001")
    evil.error(1, CAM, "video.stream_error")
    bad = json.loads(evil.lines[-1])
    collector.ingest([honest(1), Inbound(bad["topic"], json.dumps(bad["payload"]).encode(), time.time()), honest(2)])
    assert stored(collector.store) == 2
    [row] = collector.store.query("SELECT reason, detail FROM dead_letter")
    assert row["reason"] == "ingest_failed" and "IntegrityError" in row["detail"] and "refused" in row["detail"]
    # nothing of the failed message stayed: it is not taken for a duplicate when it comes again, fixed
    with collector.store.tx() as db:
        db.execute("DROP TRIGGER refuse")
    collector.ingest([Inbound(bad["topic"], json.dumps(bad["payload"]).encode(), time.time())])
    assert stored(collector.store, "evil") == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12), min_size=1, max_size=6),
    members=st.dictionaries(st.sampled_from(["v", "agent", "boot", "seq", "ts", "kind", "type", "device", "devices",
                                             "context", "error", "host", "state"]),
                            st.none() | st.integers() | st.text(max_size=10) | st.floats(allow_nan=True)
                            | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                    st.integers(), max_size=3)),
    channel=st.sampled_from(["events", "telemetry", "inventory", "state"]))
def test_arbitrary_json_beside_honest_messages_never_costs_an_honest_one(junk: list[Any], members: dict[str, Any],
                                                                          channel: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        c = Collector(SqliteStore(f"{d}/c.sqlite"))
        base = {"v": 1, "agent": "evil", "boot": "bootevil0001", "seq": 1, "ts": "2026-11-30T01:00:00Z",
                "kind": {"events": "event"}.get(channel, channel)}
        bad = [json.dumps(j).encode() for j in junk] + [json.dumps({**base, **members}).encode()]
        batch: list[Inbound] = []
        for n, raw in enumerate(bad, 1):
            batch.append(honest(n))
            batch.append(Inbound(f"pantau/v1/agents/evil/{channel}", raw, time.time()))
        c.ingest(batch)
        assert stored(c.store) == len(bad)
        for row in c.store.query("SELECT * FROM agents"):
            json.dumps(row, allow_nan=False)
        c.store.close()


def test_a_failed_commit_leaves_no_boot_id_behind(tmp_path: Path) -> None:
    """The first message of a new boot in a batch that cannot commit (SQLITE_FULL) must not leave the
    dedup cache pointing at a rolled-back row: after the retry, every message of that boot is stored."""
    db = tmp_path / "c.sqlite"
    c = Collector(SqliteStore(str(db)))
    c.ingest([honest(1)])
    pages = c.store.query("PRAGMA page_count")[0]["page_count"]
    c.store.db.execute(f"PRAGMA max_page_count = {pages}")
    new_boot = [honest(n, boot="bootsecond01") for n in range(1, 40)] + [
        Inbound(TOPIC.format("honest-1"), json.dumps({**json.loads(honest(99).payload), "device": {
            **CAM, "product": "x" * 4000}}).encode(), time.time())]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        c.ingest(new_boot)
    assert "refuses writes" in " ".join(c.health())
    c.store.db.execute("PRAGMA max_page_count = 1073741823")
    c.ingest(new_boot)  # the subscriber's retry
    c.ingest([honest(n, boot="bootsecond01") for n in range(40, 45)])
    assert c.health() == []
    assert stored(c.store) == 1 + 40 + 5
    c.store.close()


def test_the_store_on_a_full_disk_acknowledges_nothing_it_did_not_keep(tmp_path: Path) -> None:
    """A COMMIT refused by a full disk keeps nothing of its batch (no boot id either, so the next boot's
    messages are not taken for duplicates), the health check says why, and the retried batch is stored."""
    with small_fs("2m") as mnt:
        c = Collector(SqliteStore(str(mnt / "c.sqlite")))
        c.ingest([honest(n) for n in range(1, 11)])
        filler = fill(mnt)
        kept = 10
        failures = 0
        for start in range(11, 200, 20):  # the stream goes on while the disk is full; every batch a new boot
            batch = [honest(n, boot=f"boot{start:08d}") for n in range(1, 21)]
            try:
                c.ingest(batch)
                kept += 20
            except sqlite3.OperationalError as exc:
                failures += 1
                assert "full" in str(exc) or "disk" in str(exc)
                assert any("refuses writes" in r for r in c.health())
                filler.unlink()  # someone frees space; the subscriber retries the same batch
                c.ingest(batch)
                kept += 20
                filler = fill(mnt)
        filler.unlink()
        assert failures > 0, "the disk never filled"
        assert stored(c.store) == kept
        assert c.health() == []
        c.store.close()


def test_a_damaged_or_foreign_database_fails_with_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"cannot open .*bad\.sqlite"):
        SqliteStore(str(bad))
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    store = SqliteStore(str(empty))
    assert store.created_empty and store.schema_version() > 0
    store.close()


def test_serve_on_a_damaged_database_stops_with_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a header, then garbage
    out = run_cli("collector.cli", "serve", env={**__import__("os").environ, "PANTAU_DB": str(bad),
                                                 "PANTAU_HTTP": "127.0.0.1:0"}, timeout=60)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot open" in lines[0] and str(bad) in lines[0] and "Traceback" not in out.stderr


def test_an_enrolled_pc_cannot_move_itself_into_another_unit(collector: Collector) -> None:
    with collector.store.tx() as db:
        db.execute("INSERT INTO agent_accounts (agent, unit, room, enrolled_at) VALUES ('room-9', 'setjen', 'r1', "
                   "'2026-11-30T00:00:00.000Z')")
    a = Agent("room-9", "bootroom9001")
    a.started()
    for line in a.lines:
        rec = json.loads(line)
        rec["payload"]["labels"] = {"unit": "bpsdm", "room": "aula"} if rec["payload"]["kind"] == "state" else None
        if rec["payload"]["labels"] is None:
            del rec["payload"]["labels"]
        collector.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    [row] = collector.store.query("SELECT labels FROM agents WHERE agent = 'room-9'")
    assert json.loads(row["labels"]) == {"unit": "setjen", "room": "r1"}
