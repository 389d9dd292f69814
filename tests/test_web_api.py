"""The API's decisions and the registry through it: override and acknowledge with their errors,
handling reports, and loans — partial updates that change only what was given, are audited, and
survive a restart and a reload of the registry file. On both stores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector import audit
from collector.ingest import Collector
from collector.registry import load_toml
from collector.web.server import WebServer
from collector.web.settings import WebSettings
from tests.builder import CAM, SPK
from tests.web_helpers import Browser, add_user, build_site, open_test_store


@pytest.fixture
def site(tmp_path: Path, store_db: str) -> Iterator[tuple[Collector, str, Path]]:
    c = build_site(store_db, str(tmp_path / "r.toml"))
    add_user(c.store, "ani", "operator")
    add_user(c.store, "root", "admin")
    web = WebServer(c, "127.0.0.1", 0, settings=WebSettings(registry_path=str(tmp_path / "r.toml")))
    web.start()
    yield c, web.address, tmp_path
    web.stop()
    c.store.close()


def test_override_acknowledge_and_their_errors(site: tuple[Collector, str, Path]) -> None:
    c, url, _ = site
    iid = c.store.query("SELECT id FROM incidents WHERE device = ?", (CAM["key"],))[0]["id"]
    with Browser(url, "ani") as b:
        assert b.post(f"/api/incidents/{iid}/override", {"cause": "nonsense", "reason": "x"}).status_code == 400
        r = b.post(f"/api/incidents/{iid}/override", {"cause": "host_issue"})
        assert r.status_code == 400 and r.json()["error"].startswith("reason")
        assert b.post(f"/api/incidents/{iid}/override", {"cause": "host_issue", "reason": " "}).status_code == 400
        assert b.post("/api/incidents/nope/override", {"cause": "host_issue", "reason": "r"}).status_code == 404
        assert b.post("/api/incidents/nope/ack", {}).status_code == 404
        assert b.post(f"/api/incidents/{iid}/override", [1, 2]).status_code == 400
        r = b.client.post(f"/api/incidents/{iid}/ack", content=b"{not json",
                          headers={"Content-Type": "application/json", "X-CSRF-Token": b.csrf})
        assert r.status_code == 400 and r.json() == {"error": "the body is not valid JSON"}
        r = b.post(f"/api/incidents/{iid}/override", {"cause": "host_issue", "reason": "PC ruangan rusak"})
        assert r.status_code == 200 and r.json()["effective_cause"] == "host_issue" and r.json()["cause"] == \
            "device_fault"
        assert b.post(f"/api/incidents/{iid}/ack", {}).json()["acknowledged_by"] == "ani"
        one = b.get(f"/api/incidents/{iid}").json()
        assert [(h["actor"], h["action"]) for h in one["history"]] == [
            ("pantau", "opened"), ("ani", "overridden"), ("ani", "acknowledged")]
        assert one["history"][1]["detail"]["reason"] == "PC ruangan rusak"
        assert b.get("/api/audit/verify").json()["first_broken"] is None
        assert b.get("/api/incidents?status=bogus").status_code == 400


def test_handling_reports(site: tuple[Collector, str, Path]) -> None:
    c, url, _ = site
    with Browser(url, "ani") as b:
        r = b.post("/api/handling", {"agent": "room-1", "device": CAM["key"], "note": ""})
        assert r.status_code == 400
        assert b.post("/api/handling", {"agent": "nope", "device": CAM["key"], "note": "n"}).status_code == 400
        r = b.post("/api/handling", {"agent": "room-1", "device": SPK["key"], "note": "jatuh dari tripod"})
        assert r.status_code == 200 and r.json()["type"] == "handling.reported"
        assert r.json()["device"]["port"] == SPK["port"] and r.json()["context"]["reported_by"] == "ani"
    [row] = c.store.query("SELECT agent, device FROM evidence WHERE type = 'handling.reported'")
    assert row == {"agent": "room-1", "device": SPK["key"]}


def test_loans_change_only_what_is_given_are_audited_and_survive(site: tuple[Collector, str, Path]) -> None:
    c, url, tmp = site
    with Browser(url, "ani") as b:
        before = b.get(f"/api/loans/{CAM['key']}").json()
        assert (before["source"], before["condition"], before["lease_end"]) == ("file", "baru", "2027-01-04")
        r = b.post("/api/loans", {"device": CAM["key"], "note": "lensa tergores"})
        assert r.status_code == 200
        after = r.json()
        assert after["note"] == "lensa tergores" and after["source"] == "api" and after["updated_by"] == "ani"
        assert {k: after[k] for k in ("unit", "room", "lease_end", "condition")} == {
            "unit": "setjen", "room": "r1", "lease_end": "2027-01-04", "condition": "baru"}  # untouched
        assert b.post("/api/loans", {"device": CAM["key"], "lease_end": None}).json()["lease_end"] is None
        assert b.post("/api/loans", {"device": "9999:0001:NEW", "note": "x"}).status_code == 400  # needs a unit
        for body, word in (({"device": "9999:0001:NEW", "unit": "nope"}, "not registered"),
                           ({"device": CAM["key"], "room": "aula"}, "belongs to unit 'bpsdm'"),
                           ({"device": CAM["key"], "lease_start": "5 Jan"}, "date"),
                           ({"device": CAM["key"], "unit": None}, "unit"),
                           ({"device": CAM["key"], "colour": "red"}, "colour"),
                           ({"device": CAM["key"], "lease_start": "2027-02-01", "lease_end": "2027-01-04"},
                            "before lease_start")):
            r = b.post("/api/loans", body)
            assert r.status_code == 400 and word in r.json()["error"], body
        assert b.post("/api/loans", {"device": CAM["key"], "note": "lensa tergores"}).status_code == 200  # as is
        for body, code, word in (({"returned_at": "9999-12-31T23:59:59Z"}, 400, "future"),
                                 ({"returned_at": "2026-11-30T10:00:00"}, 400, "zone")):
            r = b.post(f"/api/loans/{CAM['key']}/return", body)
            assert r.status_code == code and word in r.json()["error"], body
        assert b.post("/api/loans/046d:085e:NOPE/return", {}).status_code == 404
        r = b.post("/api/loans", {"device": "9999:0001:NEW", "unit": "bpsdm", "room": "aula",
                                  "lease_start": "2026-02-01"})
        assert r.status_code == 200 and r.json()["unit"] == "bpsdm"
        r = b.post("/api/loans/9999:0001:NEW/return", {"returned_at": "2026-02-05T10:00:00+07:00"})
        assert r.status_code == 200  # stored in UTC, as the classifier reads every time
    assert c.store.query("SELECT returned_at FROM loans WHERE device = '9999:0001:NEW'")[0]["returned_at"] == \
        "2026-02-05T03:00:00.000Z"
    entries = c.store.query("SELECT actor, action, detail FROM audit WHERE action LIKE 'loan.%' ORDER BY id")
    assert [(e["actor"], e["action"]) for e in entries] == [("ani", "loan.updated"), ("ani", "loan.updated"),
                                                            ("ani", "loan.created"), ("ani", "loan.returned")]
    assert json.loads(entries[0]["detail"])["changed"] == {"note": [None, "lensa tergores"]}

    # the file changes: a loan nobody touched follows it, the one changed through the API is kept
    reg = tmp / "r.toml"
    reg.write_text(reg.read_text().replace('condition = "baru"', 'condition = "bekas"'))
    with Browser(url, "root") as admin:
        assert admin.post("/api/registry/reload", {}).status_code == 200
    loans = {r["device"]: r for r in c.store.query("SELECT * FROM loans")}
    assert loans[CAM["key"]]["condition"] == "baru" and loans[CAM["key"]]["note"] == "lensa tergores"
    assert loans["0b0e:2456:SPKB"]["condition"] == "bekas" and loans["0b0e:2456:SPKB"]["source"] == "file"
    assert "9999:0001:NEW" in loans

    # a restart: a new store on the same file loads the registry again, as the service does
    path = c.store.path
    c.store.close()
    store = open_test_store(path, tmp)
    try:
        load_toml(store, str(reg))
        again = {r["device"]: r for r in store.query("SELECT * FROM loans")}
        assert again[CAM["key"]]["note"] == "lensa tergores" and again[CAM["key"]]["lease_end"] is None
        assert "9999:0001:NEW" in again and again["0b0e:2456:SPKB"]["condition"] == "bekas"
        assert audit.verify_file(path)[1] is None
    finally:
        store.close()
    c.store = open_test_store(path, tmp)  # for the fixture's teardown


def test_filters_and_times_that_mean_nothing_are_refused(site: tuple[Collector, str, Path]) -> None:
    """A filter value that is no cause, party or kind answered an empty page; a time without its zone was
    read in the server's local time. Both are 400 now, naming the parameter."""
    _, url, _ = site
    with Browser(url, "ani") as b:
        for path, word in (("/api/incidents?cause=bogus", "cause"), ("/api/incidents?responsible=x", "responsible"),
                           ("/api/incidents?kind=device", "kind"), ("/api/fleet?kind=webcam", "kind"),
                           ("/api/incidents?since=2026-11-30T10:00:00", "since"),
                           ("/api/incidents?until=20261130", "until"), ("/api/incidents?since=2026-W48", "since"),
                           ("/api/reports/unit?unit=setjen&month=2026-1", "month")):
            r = b.get(path)
            assert r.status_code == 400 and word in r.json()["error"], (path, r.text)
        for path in ("/api/incidents?cause=device_fault&kind=device_error&since=2026-11-30T10:00:00%2B07:00",
                     "/api/incidents?since=2026-11-30&until=2026-12-01T00:00:00Z", "/api/fleet?kind=camera",
                     "/api/incidents?cause="):
            assert b.get(path).status_code == 200, path
