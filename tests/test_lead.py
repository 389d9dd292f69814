"""The lead on a shared PostgreSQL: only the collector holding it writes incidents.

A collector whose write connection was lost has lost the lead with it (another collector may take it at
once). Until it notices and stops classifying, its classifier may still try to record a decision: that
write is refused (``LostLead``) and writes nothing; the new leader records the incident once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from collector.ingest import Collector, Inbound
from collector.store import LostLead
from tests.builder import CAM, Agent
from tests.web_helpers import open_test_store


def _messages() -> list[Inbound]:
    lines: list[str] = []
    a = Agent("room-lead", "bootlead0001", lines).started()
    a.error(5, CAM, "video.stream_error")
    out = []
    for line in lines:
        rec = json.loads(line)
        out.append(Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time()))
    return out


def test_a_collector_that_lost_its_connection_records_no_decision(postgres: str, tmp_path: Path) -> None:
    a_store = open_test_store(postgres, tmp_path)
    a = Collector(a_store)  # classifies: it takes the lead
    b_store = open_test_store(postgres, tmp_path)
    b = Collector(b_store, classify=False)
    assert a_store.leading and not b_store.try_lead()

    with psycopg.connect(postgres, autocommit=True) as admin:  # A's connection cut (a network fault, a restart)
        admin.execute("SELECT pg_terminate_backend(%s)", (a_store.db.conn.info.backend_pid,))
    deadline = time.monotonic() + 5
    while not b_store.try_lead() and time.monotonic() < deadline:  # the lock went with it: B leads
        time.sleep(0.05)
    assert b_store.leading

    msgs = _messages()
    with pytest.raises(psycopg.OperationalError):
        a.ingest(msgs)  # the broken connection fails this batch (retried, as the ingest loop does)
    a.ingest(msgs)  # connected again: stored; A's classifier, not yet stopped, decides...
    assert a.classifier is not None and a.classifier.has_dirty  # ...but its write was refused: still to do
    with pytest.raises(LostLead), a_store.tx(lead=True):
        pass
    count = "SELECT count(*) AS n FROM {}"
    assert a_store.query(count.format("incidents"))[0]["n"] == 0
    assert a_store.query(count.format("evidence"))[0]["n"] == 4  # start, state, inventory, error

    b.start_classifying()  # the new leader, from what is stored
    b.follow()
    b.classify_dirty()
    a.classify_dirty()  # A tries again: refused again
    rows = b_store.query("SELECT agent, rule FROM incidents")
    assert rows == [{"agent": "room-lead", "rule": "D2"}]
    assert [r["action"] for r in b_store.query("SELECT action FROM audit ORDER BY id")] == ["opened"]
    assert not a_store.try_lead()  # while B holds it
    a_store.close()
    b_store.close()
