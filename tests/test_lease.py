"""The lease in the registry: a lease that ended yesterday or a recorded return means no missing incident
when the device is unplugged today; the loan-out snapshot is taken when the device is first seen in its
room and the return snapshot at the end; misplaced devices are flagged; the HTTP routes. On both stores."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector import leases
from collector.ingest import Collector, Inbound
from collector.registry import RegistryError, load_toml
from collector.store import Store
from collector.web.server import WebServer
from tests.builder import CAM, SPK, Agent, device
from tests.web_helpers import open_test_store, token_for

TODAY = datetime.now(UTC).date()
BASE = datetime.combine(TODAY, dtime(1, 0), tzinfo=UTC)  # the agent's morning, today
YESTERDAY = (TODAY - timedelta(days=1)).isoformat()
STRAY = device("1209:0001:STRAY", "camera", "2-3")

REGISTRY = f"""
[[units]]
id = "setjen"
name = "Sekretariat Jenderal"
rooms = [{{ id = "r1", name = "Ruang Sidang", agent = "room-1" }}, {{ id = "r2", name = "Ruang 2", agent = "room-2" }}]

[[units.devices]]
key = "{CAM['key']}"
room = "r1"
lease_start = "{(TODAY - timedelta(days=30)).isoformat()}"
lease_end = "{YESTERDAY}"
condition = "baru"

[[units.devices]]
key = "{SPK['key']}"
room = "r1"
lease_start = "{(TODAY - timedelta(days=30)).isoformat()}"
lease_end = "{(TODAY + timedelta(days=300)).isoformat()}"
"""


def feed(c: Collector, lines: list[str]) -> None:
    for line in lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    lines.clear()
    c.tick()


@pytest.fixture
def store(tmp_path: Path, store_db: str) -> Any:
    s = open_test_store(store_db, tmp_path)
    (tmp_path / "reg.toml").write_text(REGISTRY)
    load_toml(s, str(tmp_path / "reg.toml"))
    yield s
    s.close()


def test_a_lease_ended_yesterday_or_a_return_opens_no_incident_and_keeps_both_snapshots(store: Store) -> None:
    c = Collector(store)
    lines: list[str] = []
    a = Agent("room-1", "boot0001lease", lines, base=BASE).started(devices=[CAM, SPK])
    a._msg("telemetry", "telemetry", 1, host={"cpu_pct": 3.0},
           devices=[{"key": CAM["key"], "present": True, "in_use": False, "speed": "high", "errors_total": 0,
                     "resets_total": 2}, {"key": SPK["key"], "present": True, "in_use": False, "speed": "full",
                                          "errors_total": 0, "resets_total": 0}])
    feed(c, lines)
    # the loans were running when the room PC first reported them: the loan-out snapshots
    assert leases.sweep(store, BASE - timedelta(days=2)) == {"out": 2, "return": 0}
    out = leases.snapshots(store, CAM["key"])["periods"][0]["out"]
    assert out["agent"] == "room-1" and out["room"] == "r1"
    assert out["identity"]["firmware"] == "1.0" and out["identity"]["serial"] == "CAM1"
    assert out["identity"]["port"] == "2-1" and out["identity"]["max_speed"] == "high"
    assert out["health"] == {"present": True, "in_use": False, "speed": "high", "errors_total": 0, "resets_total": 2}

    # today: CAM's lease ended yesterday; the speakerphone is brought back at minute 20
    assert leases.sweep(store) == {"out": 0, "return": 1}
    leases.record_return(store, SPK["key"], "ops", (BASE + timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    time.sleep(5.2)  # the classifier re-reads the registry's leases every 5 s
    a.detach(30, CAM)
    a.detach(31, SPK)
    a.telemetry(45, [])
    feed(c, lines)
    assert store.query("SELECT device, kind FROM incidents") == []  # neither is expected in the room any more

    cam = leases.snapshots(store, CAM["key"])
    assert cam["loan"]["lease_end"] == YESTERDAY
    (period,) = cam["periods"]
    assert period["out"] is not None and period["return"]["lease_end"] == YESTERDAY
    assert period["return"]["identity"]["key"] == CAM["key"]
    spk = leases.snapshots(store, SPK["key"])["periods"][0]
    assert spk["return"]["returned_at"].startswith(TODAY.isoformat()) and spk["return"]["agent"] == "room-1"
    assert leases.sweep(store) == {"out": 0, "return": 0}  # one of each per loan
    assert [r["action"] for r in store.query("SELECT action FROM audit")] == ["loan.returned"]


def test_a_still_lent_device_unplugged_is_missed_as_before(store: Store) -> None:
    c = Collector(store)
    lines: list[str] = []
    a = Agent("room-1", "boot0002lease", lines, base=BASE).started(devices=[CAM, SPK])
    a.detach(30, SPK)
    a.telemetry(45, [])
    feed(c, lines)
    assert store.query("SELECT device, kind FROM incidents") == [{"device": SPK["key"], "kind": "device_missing"}]


def test_flags_a_lent_device_in_another_room_and_an_unlent_device_on_an_enrolled_pc(store: Store) -> None:
    c = Collector(store)
    lines: list[str] = []
    Agent("room-2", "boot0003lease", lines, base=BASE).started(devices=[SPK, STRAY])
    Agent("room-1", "boot0004lease", lines, base=BASE).started(devices=[CAM])
    feed(c, lines)
    (flag,) = leases.flags(store)
    assert flag["seen_at"].startswith(TODAY.isoformat())
    assert flag == {"flag": "lent_elsewhere", "device": SPK["key"], "agent": "room-2", "seen_at": flag["seen_at"],
                    "seen_in": ["r2"], "lent_to": {"unit": "setjen", "room": "r1"}}
    with store.tx() as db:  # room-2 and room-1 were enrolled
        db.executemany("INSERT INTO agent_accounts (agent, unit, room, enrolled_at) VALUES (?, 'setjen', ?, 'x')",
                       [("room-2", "r2"), ("room-1", "r1")])
    got = {(f["flag"], f["device"], f["agent"]) for f in leases.flags(store)}
    assert got == {("lent_elsewhere", SPK["key"], "room-2"), ("not_lent", STRAY["key"], "room-2"),
                   ("lease_ended", CAM["key"], "room-1")}  # CAM's lease ended yesterday
    # no out snapshot for a device seen only in the wrong room
    assert leases.sweep(store)["out"] == 0


def test_record_return_refuses_bad_input(store: Store) -> None:
    with pytest.raises(RegistryError, match="no loan"):
        leases.record_return(store, "1111:2222:NONE", "ops")
    with pytest.raises(RegistryError, match="RFC 3339"):
        leases.record_return(store, CAM["key"], "ops", "yesterday")
    assert store.query("SELECT returned_at FROM loans WHERE returned_at IS NOT NULL") == []


def test_http_snapshots_return_and_flags(store: Store) -> None:
    c = Collector(store)
    lines: list[str] = []
    Agent("room-1", "boot0005lease", lines, base=BASE).started(devices=[SPK])
    feed(c, lines)
    leases.sweep(store)
    op = token_for(store, "ops", "operator")
    with store.tx() as db:  # another unit, lending nothing here
        db.execute("INSERT INTO units (id, name) VALUES ('bpsdm', 'BPSDM')")
    other = token_for(store, "citra", "pic", "bpsdm")
    web = WebServer(c, "127.0.0.1", 0)
    web.start()
    try:
        with httpx.Client(base_url=web.address, timeout=10) as h:
            auth = {"Authorization": f"Bearer {op}"}
            r = h.post(f"/api/loans/{SPK['key']}/return", json={}, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["periods"][0]["return"]["agent"] == "room-1"
            assert h.post("/api/loans/nope/return", json={}, headers=auth).status_code == 404
            snap = h.get(f"/api/loans/{SPK['key']}/snapshots", headers=auth).json()
            assert snap["periods"][0]["out"]["identity"]["kind"] == "speakerphone"
            # a PIC of another unit: as if it did not exist
            assert h.get(f"/api/loans/{SPK['key']}/snapshots",
                         headers={"Authorization": f"Bearer {other}"}).status_code == 404
            assert h.get("/api/leases/flags", headers={"Authorization": f"Bearer {other}"}).json() == []
            assert h.post(f"/api/loans/{SPK['key']}/return", json={},
                          headers={"Authorization": f"Bearer {other}"}).status_code == 403
    finally:
        web.stop()


def test_a_new_lease_period_lends_a_returned_device_again(tmp_path: Path, store_db: str) -> None:
    from collector.registry import update_loan
    from tests.builder import REGISTRY

    store = open_test_store(store_db, tmp_path)
    reg = tmp_path / "r.toml"
    reg.write_text(REGISTRY)
    from collector.registry import load_toml

    load_toml(store, str(reg))
    with store.tx() as db:
        db.execute("UPDATE loans SET returned_at = '2026-11-01T00:00:00.000Z' WHERE device = '046d:085e:CAM1'")
    update_loan(store, "046d:085e:CAM1", {"note": "checked"}, "ani", "2026-11-02T00:00:00.000Z")
    assert store.query("SELECT returned_at FROM loans")[0]["returned_at"] is not None  # a note is no new loan
    row = update_loan(store, "046d:085e:CAM1", {"lease_start": "2026-12-01", "lease_end": "2027-11-30"}, "ani",
                      "2026-11-03T00:00:00.000Z")
    assert row["returned_at"] is None
    [entry] = store.query("SELECT detail FROM audit WHERE action = 'loan.updated' ORDER BY id DESC LIMIT 1")
    assert "returned_at" in entry["detail"]
    store.close()
