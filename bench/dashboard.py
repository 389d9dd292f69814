"""Dashboard at fleet scale: seeds a store with 2,000 rooms (one room PC each), 4,000 lent devices and a
year of incidents, then times what the dashboard asks for — the overview's counts, the first page of
rooms, a filtered incident page, a device's history (day, month, year) — on the server (the
``Server-Timing`` the API sends, and the whole request), and the overview's load in Chromium.

Goal: each API answer within 300 ms on the server. Seeding writes SQL straight into a store file (the
ingest path has its own benchmark); evidence is seeded for every incident and a month of starts and
inventories per room PC, not a year of every event.

    python bench/dashboard.py [--rooms 2000] [--incidents-per-device 6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the project's packages, not bench/common.py, under the name "common"

from collector import audit as audit_chain  # noqa: E402
from collector import users  # noqa: E402
from collector.ingest import Collector  # noqa: E402
from collector.store.sqlite import SqliteStore  # noqa: E402
from collector.web.server import WebServer  # noqa: E402
from common.protocol import format_epoch  # noqa: E402

GOAL_MS = 300.0
MODELS = [("046d", "085e", "camera", "Logitech BRIO", ["3.17", "3.19"]),
          ("046d", "0843", "camera", "Logitech Webcam C930e", ["0.13"]),
          ("0b0e", "2456", "speakerphone", "Jabra Speak 510", ["1.28", "1.30"]),
          ("2e7e", "0883", "speakerphone", "Poly Sync 20", ["2.0"])]
CAUSES = [("device_fault", "central_it", "D2", "device_error"), ("handling_damage", "unit", "D1", "device_error"),
          ("needs_inspection", "undetermined", "D3", "device_error"), ("host_issue", "none", "H1", "device_error"),
          ("handling_damage", "unit", "M1", "device_missing"), ("needs_inspection", "undetermined", "M2",
                                                                "device_missing")]


def seed(path: str, rooms: int, per_device: float, now: float) -> dict[str, Any]:
    rnd = random.Random(13)
    store = SqliteStore(path)
    units = max(1, rooms // 50)
    year = 365 * 86400
    t_start = time.monotonic()
    key_of: list[tuple[str, str, dict[str, Any]]] = []
    with store.tx() as db:
        db.executemany("INSERT INTO units (id, name, pic_name, pic_email, pic_phone) VALUES (?,?,?,?,?)",
                       [(f"u{u:03d}", f"Unit Kerja {u:03d}", f"PIC {u:03d}", f"pic{u}@example.go.id", None)
                        for u in range(units)])
        agents, loans, room_rows = [], [], []
        for i in range(rooms):
            unit, agent, room = f"u{i % units:03d}", f"pc-{i:04d}", f"r{i:04d}"
            room_rows.append((room, unit, f"Ruang Rapat {i:04d}", agent))
            inv, tele = [], []
            for j in range(2):
                vid, pid, kind, product, fws = MODELS[(i + j) % 2 * 2 + rnd.randrange(2)] if j else \
                    MODELS[rnd.randrange(2)]
                serial = f"S{i:04d}{j}"
                key = f"{vid}:{pid}:{serial}"
                dev: dict[str, Any] = {"key": key, "vid": vid, "pid": pid, "serial": serial, "kind": kind,
                                       "vendor": product.split()[0], "product": product, "port": f"1-{j + 1}",
                                       "speed": "high", "max_speed": "high", "firmware": rnd.choice(fws)}
                key_of.append((agent, key, dev))
                loans.append((key, unit, room, "2026-01-05", "2027-01-04", "baru"))
                if rnd.random() > 0.01:  # about 1 % of devices are not attached now
                    inv.append(dev)
                    tele.append({"key": key, "present": True, "in_use": rnd.random() < 0.15, "speed": "high",
                                 "errors_total": 0, "resets_total": 0})
            online = rnd.random() > 0.03
            last = now - (30 if online else rnd.uniform(3600, 5 * 86400))
            agents.append((agent, "online" if online else "offline", None if online else "lost", f"b{i:04d}",
                           agent, "1.1.0", "windows", json.dumps({"unit": unit, "room": room}), format_epoch(last),
                           json.dumps(inv), json.dumps({"cpu_pct": 5.0}), json.dumps(tele), format_epoch(last),
                           rnd.choice([0.4, 1.2, -0.8, 2.0, 400.0]) if rnd.random() < 0.02 else 0.5))
        db.executemany("INSERT INTO rooms (id, unit, name, agent) VALUES (?,?,?,?)", room_rows)
        db.executemany("INSERT INTO loans (device, unit, room, lease_start, lease_end, condition) VALUES "
                       "(?,?,?,?,?,?)", loans)
        db.executemany("INSERT INTO agents (agent, state, reason, boot, hostname, version, platform, labels, "
                       "last_seen, inventory, host, devices, clock, clock_offset_s) VALUES "
                       "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", agents)
        incidents: list[tuple[Any, ...]] = []
        evidence: list[tuple[Any, ...]] = []
        opened: list[tuple[str, str]] = []
        n_inc = int(len(key_of) * per_device)
        for k in range(n_inc):
            agent, key, dev = key_of[rnd.randrange(len(key_of))]
            cause, resp, rule, kind = CAUSES[rnd.randrange(len(CAUSES))]
            t0 = now - rnd.uniform(0, year)
            resolved = t0 + rnd.uniform(60, 3 * 86400)
            status = "open" if resolved > now or rnd.random() < 0.01 else \
                ("withdrawn" if rnd.random() < 0.02 else "resolved")
            iid = f"{k:016x}"
            boot = f"b{agent}"
            etype = "device.error" if kind == "device_error" else "device.detached"
            ev: dict[str, Any] = {"v": 1, "agent": agent, "boot": boot, "seq": 10 * k, "ts": format_epoch(t0),
                                  "kind": "event", "type": etype, "device": dev}
            if etype == "device.error":
                ev["error"] = {"code": "video.stream_error", "source": "kernel", "errno": -71,
                               "message": "uvcvideo: Failed to resubmit video URB (-71).", "count": 1}
            else:
                ev["context"] = {"in_use": rule == "M1", "users": ["zoom"] if rule == "M1" else [],
                                 "meeting": rule == "M1"}
            evidence.append((agent, boot, 10 * k, format_epoch(t0), "event", etype, key, json.dumps(ev),
                             format_epoch(t0)))
            refs = [{"boot": boot, "seq": 10 * k, "type": etype, "ts": format_epoch(t0)}]
            summary = f"{dev['product']} di {agent}: {rule}"
            decided = ("device_fault", "central_it", "ani", "kabel diperiksa", format_epoch(t0 + 86400)) \
                if rnd.random() < 0.03 else (None, None, None, None, None)
            incidents.append((iid, agent, key, kind, status, cause, resp, 0.8, rule, "1.1", format_epoch(t0),
                              None if status == "open" else format_epoch(min(resolved, now)), json.dumps(refs),
                              summary, json.dumps({"id": summary, "en": summary}), *decided,
                              format_epoch(min(resolved, now))))
            opened.append((format_epoch(t0), iid))
        db.executemany("INSERT INTO incidents (id, agent, device, kind, status, cause, responsible, confidence, rule, "
                       "policy, opened_at, resolved_at, evidence, summary, summaries, decided_cause, "
                       "decided_responsible, decided_by, decided_reason, decided_at, updated_at) VALUES "
                       "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", incidents)
        for at, iid in sorted(opened):
            audit_chain.append(db, at, "pantau", iid, "opened", {"rule": "seeded"})
        for i in range(rooms):  # a month of starts and inventories per room PC
            agent = f"pc-{i:04d}"
            for d in range(30):
                t = now - d * 86400 - 7 * 3600
                for seq, etype in ((1, "agent.started"), (2, "inventory")):
                    evidence.append((agent, f"d{d}", seq, format_epoch(t), "event" if seq == 1 else "inventory",
                                     etype, None, "{}", format_epoch(t)))
        db.executemany("INSERT INTO evidence (agent, boot, seq, ts, kind, type, device, payload, received_at) "
                       "VALUES (?,?,?,?,?,?,?,?,?)", evidence)
        # history: a year of hourly and 90 days of 5-minute rollups for one device; a week for every device
        agent, key, _ = key_of[7]
        rows: list[tuple[Any, ...]] = []
        for res, span in ((3600, year), (300, 90 * 86400)):
            for b in range(int((now - span) // res * res), int(now), res):
                metrics: list[tuple[str, float]] = [("present", 1.0), ("in_use", float(rnd.random() < 0.2)),
                                                    ("errors_total", float(b // 86400 % 7)), ("speed_rank", 2.0)]
                for m, v in metrics:
                    rows.append((res, b, agent, key, m, 10, 10 * float(v), float(v), float(v), b))
        for ag, dkey, _ in key_of:
            for b in range(int((now - 7 * 86400) // 3600 * 3600), int(now), 3600):
                rows.append((3600, b, ag, dkey, "present", 120, 120.0, 1.0, 1.0, b))
        db.executemany("INSERT OR IGNORE INTO rollup (res, bucket, agent, device, metric, n, sum, min, max, rx) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO device_samples (ts, agent, device, present, in_use, errors_total, resets_total, "
                       "speed_rank, rx) VALUES (?,?,?,?,?,?,?,?,?)",
                       [(t, agent, key, 1, 0, 3, 0, 2, t) for t in range(int(now - 86400), int(now), 30)])
    users.add(store, "ani", "operator", None, "bench-password-1", "bench")
    users.add(store, "pic", "pic", "u001", "bench-password-1", "bench")
    counts = {t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in
              ("rooms", "loans", "incidents", "evidence", "audit", "rollup")}
    store.db.execute("ANALYZE")
    store.close()
    return {"seconds": round(time.monotonic() - t_start, 1), **counts, "device": key, "agent": agent}


def timed(client: httpx.Client, path: str, n: int = 7, cold: Any = None) -> tuple[float, float, float, int]:
    """(median server ms, max server ms, median whole-request ms, response bytes on the wire); ``cold`` is
    called before each request (to drop the rooms cache, so each is computed afresh)."""
    server: list[float] = []
    whole: list[float] = []
    size = 0
    for _ in range(n):
        if cold is not None:
            cold()
        t0 = time.perf_counter()
        r = client.get(path, headers={"Accept-Encoding": "gzip"})
        whole.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        st = r.headers.get("server-timing", "")
        server.append(float(st.split("dur=")[1]) if "dur=" in st else whole[-1])
        size = int(r.headers.get("content-length") or len(r.content))
    return statistics.median(server), max(server), statistics.median(whole), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rooms", type=int, default=2000)
    ap.add_argument("--incidents-per-device", type=float, default=6.0)
    ap.add_argument("--keep", help="seed into (or reuse) this folder instead of a temporary one")
    args = ap.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="pantau-bench-dash-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "dash.sqlite")
    now = time.time()
    fresh = not Path(path).exists()
    info = seed(path, args.rooms, args.incidents_per_device, now) if fresh else json.loads(
        (folder / "seed.json").read_text())
    (folder / "seed.json").write_text(json.dumps(info))
    print(f"seeded: {info}")
    store = SqliteStore(path)
    web = WebServer(Collector(store, classify=False), "127.0.0.1", 0)
    web.start()
    base = web.address.rstrip("/")
    dev, agent = info["device"], info["agent"]
    month_ago = format_epoch(now - 30 * 86400)[:10]
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            r = c.post("/api/login", json={"username": "ani", "password": "bench-password-1"},
                       headers={"Origin": base})
            assert r.status_code == 200, r.text
            checks = [
                ("overview counts (computed afresh)", "/api/overview"),
                ("overview counts (nothing changed since)", "/api/overview"),
                ("rooms, first page (computed afresh)", "/api/fleet?limit=25"),
                ("rooms, search 'Ruang Rapat 01' (afresh)", "/api/fleet?q=Ruang%20Rapat%2001&limit=25"),
                ("incidents, first page (25)", "/api/incidents?limit=25"),
                ("incidents, filtered (unit, cause, since, q)",
                 f"/api/incidents?unit=u001&cause=handling_damage&status=all&since={month_ago}&q=brio&limit=25"),
                ("incidents, open, sorted by unit, page 3", "/api/incidents?status=open&sort=unit&order=asc"
                                                              "&limit=25&offset=50"),
                ("device history, a day (raw)", f"/api/devices/{dev}/history?agent={agent}"),
                ("device history, a month (1 h)", f"/api/devices/{dev}/history?agent={agent}&from="
                                                  f"{format_epoch(now - 30 * 86400)}"),
                ("device history, a year (1 d)", f"/api/devices/{dev}/history?agent={agent}&from="
                                                 f"{format_epoch(now - 364 * 86400)}"),
                ("room PC history, a week", f"/api/agents/{agent}/history?from={format_epoch(now - 7 * 86400)}"),
                ("unit report, a month", f"/api/reports/unit?unit=u001&month={format_epoch(now)[:7]}"),
                ("failure-rate report, a year", "/api/reports/failure-rates"),
            ]
            print(f"\n{'what':48} {'server ms (median/max)':>24} {'request ms':>11} {'bytes gz':>9}")
            worst = 0.0
            for label, path_ in checks:
                st = web.app.state.pantau
                cold = (lambda st=st: st.__dict__.pop("snapshots", None)) if "afresh" in label else None
                med, top, whole, size = timed(c, path_, 3 if "report" in label else 7, cold)
                goal = "report" not in label
                worst = max(worst, med) if goal else worst
                print(f"{label:48} {med:11.1f} / {top:8.1f}   {whole:11.1f} {size:9d}"
                      f"{'' if not goal else ('  ok' if med <= GOAL_MS else '  OVER GOAL')}")
            print(f"\nworst median of the goal rows: {worst:.1f} ms (goal {GOAL_MS:.0f} ms)")
        chromium(base)
    finally:
        web.stop()
        store.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def chromium(base: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        page = b.new_context().new_page()
        page.goto(base + "/login")
        page.fill("#username", "ani")
        page.fill("#password", "bench-password-1")
        page.click("#login button[type=submit]")
        page.wait_for_selector("#rooms tbody tr[data-agent]", timeout=60000)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            page.goto(base + "/#/")
            page.reload()
            page.wait_for_selector("#rooms tbody tr[data-agent]", timeout=60000)
            page.wait_for_selector("#incidents tbody tr[data-id]", state="attached", timeout=60000)
            page.wait_for_selector("#counts .count")
            times.append((time.perf_counter() - t0) * 1000)
        rooms_h = page.evaluate("document.documentElement.scrollHeight")
        page.click("#tab-incidents")
        inc_h = page.evaluate("document.documentElement.scrollHeight")
        print(f"Chromium: overview loaded (counts, a page of rooms and of incidents) in "
              f"{statistics.median(times):.0f} ms "
              f"(median of 3; {', '.join(f'{x:.0f}' for x in times)}); page height at 1280x720: {rooms_h} px with "
              f"the rooms tab, {inc_h} px with the incidents tab")
        b.close()


if __name__ == "__main__":
    main()
