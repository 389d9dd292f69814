"""Report figures against figures worked out by hand on a small fixture (the sums are in the comments),
through the API, the CSV and the failure-rate table, on both stores."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import reports
from collector.registry import load
from collector.store import Store
from collector.web.server import WebServer
from tests.web_helpers import Browser, add_user, open_test_store

A, B, C = "046d:085e:AAA", "0b0e:2456:BBB", "046d:085e:CCC"
REGISTRY = {"units": [
    {"id": "setjen", "name": "Sekretariat Jenderal", "pic": {"name": "Budi"},
     "rooms": [{"id": "r1", "name": "Ruang Sidang", "agent": "room-1"}],
     "devices": [{"key": A, "room": "r1", "lease_start": "2026-10-15", "lease_end": "2026-11-10"},
                 {"key": B, "room": "r1"}]},
    {"id": "bpsdm", "name": "BPSDM", "pic": {"name": "Citra"},
     "rooms": [{"id": "aula", "name": "Aula", "agent": "aula"}], "devices": [{"key": C, "room": "aula"}]}]}


def _dev(key: str, fw: str) -> dict[str, str]:
    vid, pid, serial = key.split(":")
    return {"key": key, "vid": vid, "pid": pid, "serial": serial, "kind": "camera", "product": f"P-{pid}",
            "firmware": fw}


def _incident(db: Any, iid: str, device: str, agent: str, kind: str, cause: str, resp: str, rule: str, opened: str,
              resolved: str | None, status: str = "resolved", decided: tuple[str, ...] | None = None) -> None:
    db.execute("INSERT INTO incidents (id, agent, device, kind, status, cause, responsible, confidence, rule, "
               "opened_at, resolved_at, evidence, summary, decided_cause, decided_responsible, decided_by, "
               "decided_reason, decided_at, updated_at) VALUES (?,?,?,?,?,?,?,0.8,?,?,?,'[]','s',?,?,?,?,?,?)",
               (iid, agent, device, kind, status, cause, resp, rule, opened, resolved,
                *(decided or (None, None, None, None, None)), opened))


@pytest.fixture
def store(tmp_path: Path, store_db: str) -> Iterator[Store]:
    s = open_test_store(store_db, tmp_path)
    load(s, REGISTRY)
    with s.tx() as db:
        db.execute("INSERT INTO agents (agent, inventory) VALUES ('room-1', ?), ('aula', ?)",
                   (json.dumps([_dev(A, "3.17"), _dev(B, "1.30")]), json.dumps([_dev(C, "3.19")])))
        # A: an error 11-02 00:00-12:00 and a missing 11-02 06:00-11-03 00:00 overlap: down 24 h
        _incident(db, "i1", A, "room-1", "device_error", "device_fault", "central_it", "D2",
                  "2026-11-02T00:00:00.000Z", "2026-11-02T12:00:00.000Z")
        _incident(db, "i2", A, "room-1", "device_missing", "handling_damage", "unit", "M1",
                  "2026-11-02T06:00:00.000Z", "2026-11-03T00:00:00.000Z")
        # B: opened in October, down 6 h of November; opened 11-20 and still open: down to 12-01, 264 h,
        # decided by central IT as handling damage; a withdrawn one counts for nothing
        _incident(db, "i3", B, "room-1", "device_error", "device_fault", "central_it", "D2",
                  "2026-10-31T18:00:00.000Z", "2026-11-01T06:00:00.000Z")
        _incident(db, "i4", B, "room-1", "device_error", "needs_inspection", "undetermined", "D3",
                  "2026-11-20T00:00:00.000Z", None, "open",
                  ("handling_damage", "unit", "ani", "kabel putus", "2026-11-21T00:00:00.000Z"))
        _incident(db, "i5", B, "room-1", "device_error", "device_fault", "central_it", "D2",
                  "2026-11-15T00:00:00.000Z", "2026-11-15T01:00:00.000Z", "withdrawn")
        _incident(db, "i6", C, "aula", "device_error", "device_fault", "central_it", "D2",
                  "2026-11-05T00:00:00.000Z", "2026-11-05T02:00:00.000Z")
    yield s
    s.close()


def test_unit_month_by_hand(store: Store) -> None:
    now = reports.between("2026-12-05", "2026-12-05").start  # after November: open incidents run to its end
    rep = reports.unit_report(store, "setjen", reports.month("2026-11"), now)
    # lent: A 11-01..11-10 inclusive = 10 days, B the whole month = 30 days
    assert rep["devices_lent"] == 2 and rep["device_days"] == 40.0
    per = {d["device"]: d for d in rep["devices"]}
    assert (per[A]["device_days"], per[A]["down_hours"], per[A]["incidents"]) == (10.0, 24.0, 2)
    assert (per[B]["device_days"], per[B]["down_hours"], per[B]["incidents"]) == (30.0, 270.0, 1)
    # availability = 1 - (24 + 6 + 264) / (40 * 24) = 1 - 294/960 = 0.69375
    assert rep["availability"] == 0.69375 and rep["down_hours"] == 294.0
    # opened in November, not withdrawn, of setjen: i1 (device fault), i2 (M1), i4 (decided: handling damage)
    assert rep["incidents"] == 3
    assert rep["by_cause"] == {"device_fault": 1, "handling_damage": 2, "host_issue": 0, "needs_inspection": 0}
    assert rep["by_responsible"] == {"central_it": 1, "unit": 2, "none": 0, "undetermined": 0}
    assert [(o["id"], o["cause"], o["decided_cause"], o["decided_by"]) for o in rep["overrides"]] == [
        ("i4", "needs_inspection", "handling_damage", "ani")]
    rows = list(csv.reader(io.StringIO(reports.unit_report_csv(rep))))
    assert rows[0][:3] == ["unit", "period", "device"]
    assert rows[-1][2:] == ["TOTAL", "", "", "", "40.0", "294.0", "69.38", "3", "1", "2", "0", "0"]
    # a lease period: A's own lease, 10-15..11-10 (27 days): i1 and i2 only, down 24 h
    lease = reports.unit_report(store, "setjen", reports.between("2026-10-15", "2026-11-10"), now)
    assert {d["device"]: d["device_days"] for d in lease["devices"]} == {A: 27.0, B: 27.0}


def test_failure_rates_by_hand(store: Store) -> None:
    rows = reports.failure_rates(store, reports.month("2026-11"))
    got = {(g["model"], g["firmware"]): g for g in rows}
    # device-months: A 10/30.4375 = 0.32854, B and C 30/30.4375 = 0.98563
    a, b, c = got[("046d:085e", "3.17")], got[("0b0e:2456", "1.30")], got[("046d:085e", "3.19")]
    assert (a["devices"], a["device_months"], a["incidents"], a["device_faults"]) == (1, 0.329, 2, 1)
    assert (a["incidents_per_100"], a["faults_per_100"]) == (608.75, 304.38)  # 200/0.32854, 100/0.32854
    assert (b["incidents"], b["device_faults"], b["incidents_per_100"], b["faults_per_100"]) == (1, 0, 101.46, 0.0)
    assert (c["incidents"], c["device_faults"], c["faults_per_100"]) == (1, 1, 101.46)
    assert rows[0] is a  # the worst first
    assert reports.failure_rates(store, reports.month("2026-11"), unit="bpsdm") == [c]
    text = reports.failure_rates_csv(rows, reports.month("2026-11"))
    assert text.splitlines()[1].startswith("2026-11,046d:085e,3.17,P-085e,1,0.329,2,608.75,1,304.38")


def test_reports_through_the_api_scoped_and_as_csv(store: Store) -> None:
    from collector.ingest import Collector

    add_user(store, "ani", "operator")
    add_user(store, "citra", "pic", "bpsdm")
    web = WebServer(Collector(store, classify=False), "127.0.0.1", 0)
    web.start()
    try:
        with Browser(web.address, "ani") as b:
            r = b.get("/api/reports/unit?unit=setjen&month=2026-11")
            assert r.status_code == 200 and r.json()["devices_lent"] == 2 and r.json()["incidents"] == 3
            r = b.get("/api/reports/unit?unit=setjen&month=2026-11&format=csv")
            assert r.headers["content-type"].startswith("text/csv") and "TOTAL" in r.text
            assert 'filename="pantau-setjen-2026-11.csv"' in r.headers["content-disposition"]
            for bad in ("month=2026-13", "month=x", "from=2026-11-02&to=2026-11-01", ""):
                r = b.get(f"/api/reports/unit?unit=setjen&{bad}")
                assert r.status_code == 400 and r.json()["error"], bad
            assert b.get("/api/reports/unit?unit=nope&month=2026-11").status_code == 404
            r = b.get("/api/reports/failure-rates?month=2026-11")
            assert {(g["model"], g["firmware"]) for g in r.json()["rows"]} == {
                ("046d:085e", "3.17"), ("0b0e:2456", "1.30"), ("046d:085e", "3.19")}
        with Browser(web.address, "citra") as pic:  # their unit, whatever they ask for
            assert pic.get("/api/reports/unit?unit=setjen&month=2026-11").json()["unit"] == "bpsdm"
            rows = pic.get("/api/reports/failure-rates?month=2026-11").json()["rows"]
            assert [(g["model"], g["firmware"]) for g in rows] == [("046d:085e", "3.19")]
    finally:
        web.stop()


def test_csv_cells_a_spreadsheet_would_run_are_written_as_text() -> None:
    from collector.reports import _cell

    for hostile in ("=1+1", "\r=HYPERLINK(\"http://x\")", "\n=cmd|'/C calc'!A0", "\t=1+2", "  @SUM(A1)", "+1-2"):
        out = _cell(hostile)
        assert out.startswith("'") and "\r" not in out and "\t" not in out
    assert _cell("-3.5") == "-3.5" and _cell("Logitech C930e") == "Logitech C930e"
