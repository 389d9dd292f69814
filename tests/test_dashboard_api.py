"""The dashboard's read API: incident pages (filters, search, sort, offsets, totals) answered by the store
and compressed; history from the rollups against figures worked out by hand; the change feed, which tells
a PIC only of their unit; and what a hostile query gets (one-line 400s, 404s across units). On both stores."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.ingest import Collector, Inbound
from collector.web.server import WebServer
from tests.builder import CAM, SPK, Agent
from tests.web_helpers import SPK_B, Browser, add_user, build_site


@pytest.fixture
def site(tmp_path: Path, store_db: str) -> Iterator[tuple[Collector, str]]:
    c = build_site(store_db, str(tmp_path / "r.toml"))
    add_user(c.store, "ani", "operator")
    add_user(c.store, "citra", "pic", "bpsdm")
    web = WebServer(c, "127.0.0.1", 0)
    web.start()
    yield c, web.address.rstrip("/")
    web.stop()
    c.store.close()


def _more_incidents(c: Collector, n: int) -> None:
    """n resolved device errors on room-1's speakerphone, one a minute apart from 02:00."""
    with c.store.tx() as db:
        for i in range(n):
            db.execute("INSERT INTO incidents (id, agent, device, kind, status, cause, responsible, confidence, rule, "
                       "opened_at, resolved_at, evidence, summary, updated_at) VALUES (?, 'room-1', ?, 'device_error', "
                       "'resolved', 'needs_inspection', 'undetermined', 0.5, 'D3', ?, ?, '[]', 'Speaker kabel', ?)",
                       (f"x{i:03d}", SPK["key"], f"2026-11-30T02:{i:02d}:00.000Z", f"2026-11-30T02:{i:02d}:30.000Z",
                        "2026-11-30T02:00:00.000Z"))


def test_incident_pages_filters_search_sort_and_totals(site: tuple[Collector, str]) -> None:
    c, url = site
    _more_incidents(c, 30)
    with Browser(url, "ani") as b:
        r = b.get("/api/incidents?status=all&limit=10")
        assert r.status_code == 200 and r.headers["x-total-count"] == "32" and len(r.json()) == 10
        first = [i["opened_at"] for i in r.json()]
        assert first == sorted(first, reverse=True) and first[0] == "2026-11-30T02:29:00.000Z"
        pages = [i["id"] for off in (0, 10, 20, 30) for i in b.get(f"/api/incidents?status=all&limit=10"
                                                                  f"&offset={off}").json()]
        assert len(pages) == len(set(pages)) == 32  # every incident once over the pages
        asc = b.get("/api/incidents?status=all&sort=opened_at&order=asc&limit=1").json()
        assert asc[0]["opened_at"] == "2026-11-30T01:30:00.000Z"
        r = b.get("/api/incidents?status=all&unit=bpsdm")
        assert [i["device"] for i in r.json()] == [SPK_B["key"]] and r.json()[0]["pic_name"] == "Citra"
        assert b.get("/api/incidents?status=all&cause=device_fault").headers["x-total-count"] == "1"
        assert b.get("/api/incidents?status=resolved").headers["x-total-count"] == "30"
        assert b.get("/api/incidents?model=0b0e:2456&status=all").headers["x-total-count"] == "31"
        since = b.get("/api/incidents?status=all&since=2026-11-30T02:10:00Z&until=2026-11-30T02:20:00Z")
        assert since.headers["x-total-count"] == "10"  # 02:10 .. 02:19, the end excluded
        for q, n in (("citra", 1), ("Ruang Sidang", 31), ("sekretariat", 31), ("kabel", 30), ("SPKB", 1),
                     ("tidak-ada", 0)):
            assert b.get(f"/api/incidents?status=all&q={q}").headers["x-total-count"] == str(n), q
        by_unit = b.get("/api/incidents?status=all&sort=unit&order=asc&limit=1").json()
        assert by_unit[0]["unit_name"] == "BPSDM"
        raw = httpx.get(url + "/api/incidents?status=all&limit=30", cookies=b.client.cookies,
                        headers={"Accept-Encoding": "gzip"})
        assert raw.headers["content-encoding"] == "gzip" and raw.num_bytes_downloaded < len(raw.content) / 3
        for bad, word in (("limit=0", "limit"), ("limit=100000", "limit"), ("offset=-1", "offset"),
                          ("sort=password", "sort"), ("order=sideways", "order"), ("since=yesterday", "since"),
                          ("until=1999-01-01", "until"), ("status=gone", "status")):
            r = b.get(f"/api/incidents?{bad}")
            assert r.status_code == 400 and word in r.json()["error"] and "\n" not in r.json()["error"], bad


def test_overview_rooms_and_a_pic_across_units(site: tuple[Collector, str]) -> None:
    c, url = site
    cam = c.store.query("SELECT id FROM incidents WHERE device = ?", (CAM["key"],))[0]["id"]
    with Browser(url, "ani") as b:
        o = b.get("/api/overview").json()
        assert o["fleet"]["rooms"] == 2 and o["fleet"]["missing"] == 1 and o["fleet"]["pulled_in_use"] == 1
        assert o["fleet"]["error"] == 1 and o["incidents"]["open"] == 2
        assert o["incidents"]["by_cause"] == {"device_fault": 1, "handling_damage": 1}
        rooms = b.get("/api/fleet?status=missing").json()
        assert [r["agent"] for r in rooms] == ["aula-bpsdm"]
        [spk] = rooms[0]["devices"]
        assert (spk["key"], spk["status"], spk["pulled_in_use"], spk["users"]) == (SPK_B["key"], "missing", True,
                                                                                   ["zoom"])
        assert b.get("/api/fleet?q=budi").headers["x-total-count"] == "1"
        assert b.get("/api/fleet?status=nonsense").status_code == 400
        one = b.get(f"/api/incidents/{cam}").json()
        assert [(e["type"], e["role"], e["code"]) for e in one["evidence"]] == [
            ("device.error", "trouble", "video.stream_error")]
        assert one["rule_text"]["explain"]["en"].startswith("The device reported its own failure")
    with Browser(url, "citra") as pic:
        o = pic.get("/api/overview?unit=setjen").json()
        assert o["unit"] == "bpsdm" and o["fleet"]["rooms"] == 1 and o["incidents"]["open"] == 1
        assert [r["agent"] for r in pic.get("/api/fleet?unit=setjen").json()] == ["aula-bpsdm"]
        for path in (f"/api/incidents/{cam}", "/api/fleet/room-1", f"/api/devices/{CAM['key']}",
                     f"/api/devices/{CAM['key']}/history", "/api/agents/room-1/history"):
            r = pic.get(path)
            assert r.status_code == 404, path
        assert pic.get(f"/api/devices/{SPK_B['key']}").status_code == 200
        assert pic.get("/api/agents/aula-bpsdm/history").status_code == 200


def test_history_from_the_rollups_by_hand(site: tuple[Collector, str]) -> None:
    c, url = site
    t0 = 1_780_000_200.0  # a 5-minute bucket starts here (divisible by 300)
    # two buckets: present 1,1,1 and in use 0,1,1 in the first; the error counter 4, 4, 7 then 7, 9
    rows = [(t0 + 0, 1, 0, 4.0, 2), (t0 + 100, 1, 1, 4.0, 2), (t0 + 200, 1, 1, 7.0, 1),
            (t0 + 300, 1, 1, 7.0, 2), (t0 + 400, 0, 0, 9.0, 2)]
    host = [(t0 + 0, 10.0), (t0 + 100, 30.0), (t0 + 300, 50.0)]
    with c.store.tx() as db:
        db.executemany("INSERT INTO device_samples (ts, agent, device, present, in_use, errors_total, resets_total, "
                       "speed_rank, rx) VALUES (?, 'room-1', ?, ?, ?, ?, 0, ?, ?)",
                       [(t, CAM["key"], p, u, e, s, t) for t, p, u, e, s in rows])
        db.executemany("INSERT INTO host_samples (ts, agent, cpu_pct, rx) VALUES (?, 'room-1', ?, ?)",
                       [(t, v, t) for t, v in host])
    c.store.roll_up_and_expire(t0 + 3600)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 600))
    with Browser(url, "ani") as b:
        h = b.get(f"/api/devices/{CAM['key']}/history?agent=room-1&from={iso}&to={end}&step=5m").json()
        assert h["step"] == 300
        assert h["series"]["present"] == [[t0, 1.0, 1.0, 1.0, 3], [t0 + 300, 0.5, 0.0, 1.0, 2]]
        assert [p[1] for p in h["series"]["in_use"]] == [pytest.approx(2 / 3), 0.5]
        assert [p[1] for p in h["series"]["speed_rank"]] == [pytest.approx(5 / 3), 2.0]
        assert h["errors"] == [[t0, 3.0], [t0 + 300, 2.0]]  # 7 - 4 in the first, 9 - 7 in the second
        raw = b.get(f"/api/devices/{CAM['key']}/history?agent=room-1&from={iso}&to={end}&step=raw").json()
        assert [p[1] for p in raw["series"]["errors_total"]] == [4.0, 4.0, 7.0, 7.0, 9.0]
        a = b.get(f"/api/agents/room-1/history?from={iso}&to={end}&step=300").json()
        assert a["series"]["cpu_pct"] == [[t0, 20.0, 10.0, 30.0, 2], [t0 + 300, 50.0, 50.0, 50.0, 1]]
        for bad in ("step=2m", f"from={end}&to={iso}", "from=soon", "from=1990-01-01"):
            r = b.get(f"/api/devices/{CAM['key']}/history?agent=room-1&{bad}")
            assert r.status_code == 400 and r.json()["error"], bad
        assert b.get("/api/devices/ffff:ffff:NOPE/history").status_code == 404


def _listen(url: str, cookies: Any, out: list[dict[str, Any]], stop: threading.Event) -> None:
    with httpx.stream("GET", url + "/api/events", cookies=cookies, timeout=20) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
            if stop.is_set():
                return


def test_the_change_feed_tells_a_pic_only_of_their_unit(site: tuple[Collector, str]) -> None:
    c, url = site
    got_pic: list[dict[str, Any]] = []
    got_op: list[dict[str, Any]] = []
    stop = threading.Event()
    with Browser(url, "citra") as pic, Browser(url, "ani") as op:
        threads = [threading.Thread(target=_listen, args=(url, who.client.cookies, out, stop), daemon=True)
                   for who, out in ((pic, got_pic), (op, got_op))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        lines: list[str] = []
        a = Agent("room-1", "bootaaaa0002", lines, prev_boot="bootaaaa0001").started(60)
        a.detach(61, SPK, in_use=True)
        for line in lines:
            rec = json.loads(line)
            c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
        deadline = time.monotonic() + 5
        while not any("room-1" in m["agents"] for m in got_op) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("room-1" in m["agents"] for m in got_op)
        assert all("room-1" not in m["agents"] for m in got_pic)  # another unit's PC: never named to a PIC
        r = pic.post("/api/handling", {"agent": "aula-bpsdm", "device": SPK_B["key"], "note": "jatuh"})
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while not any("aula-bpsdm" in m["agents"] for m in got_pic) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        assert any("aula-bpsdm" in m["agents"] for m in got_pic)
        assert all(set(m["agents"]) <= {"aula-bpsdm"} for m in got_pic)
