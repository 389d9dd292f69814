"""Screenshots of the overview, a room, an incident and a report at 1280 and 390 px (saved to
/tmp/pantau-screens/ for people to look at), and what a phone needs: nothing wider than the screen,
and the handling-report dialog's Save in view. Once on PostgreSQL too (a smoke test of the whole dashboard on
the server store)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.builder import CAM
from tests.web_helpers import SPK_B, Site, sign_in

OUT = Path("/tmp/pantau-screens")


@pytest.fixture
def site(tmp_path: Path, request: pytest.FixtureRequest, store: str) -> Iterator[Site]:
    s = Site(tmp_path, request.getfixturevalue("postgres") if store == "postgresql" else None)
    now = time.time()
    rows, host = [], []
    for i in range(0, 86400, 60):  # a day of telemetry: in use in working hours, errors in the afternoon
        t = now - 86400 + i
        in_use = 1 if 3 * 3600 < i % 86400 < 9 * 3600 else 0
        rows.append((t, "room-1", CAM["key"], 1, in_use, float(max(0, i - 70000) // 600), 0.0, 2, t))
        host.append((t, "room-1", 20 + 15 * math.sin(i / 5000), 45.0, 63.0, float(i), 50 + 5 * math.cos(i / 9000), t))
    with s.store.tx() as db:
        db.executemany("INSERT INTO device_samples (ts, agent, device, present, in_use, errors_total, resets_total, "
                       "speed_rank, rx) VALUES (?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO host_samples (ts, agent, cpu_pct, mem_pct, disk_pct, uptime_s, temp_c, rx) "
                       "VALUES (?,?,?,?,?,?,?,?)", host)
    s.store.roll_up_and_expire(now)
    yield s
    s.web.stop()
    s.store.close()


def _no_overflow(page: Any) -> None:
    wide = page.evaluate("document.documentElement.scrollWidth")
    assert wide <= page.viewport_size["width"], f"{page.url}: {wide} px wide"


@pytest.mark.parametrize("width,height,store", [(1280, 800, "sqlite"), (390, 844, "sqlite"), (1280, 800, "postgresql")])
def test_screens(site: Site, browser: Any, width: int, height: int, store: str) -> None:
    OUT.mkdir(exist_ok=True)
    page = sign_in(browser, site, "ani")
    page.set_viewport_size({"width": width, "height": height})
    cam = site.ids[CAM["key"]]

    page.wait_for_selector("#rooms tbody tr[data-agent]")
    page.screenshot(path=str(OUT / f"overview-{width}.png"), full_page=True)
    _no_overflow(page)
    page.click("#tab-incidents")
    page.wait_for_selector("#incidents tbody tr[data-id]")
    page.screenshot(path=str(OUT / f"overview-incidents-{width}.png"), full_page=True)
    _no_overflow(page)

    page.goto(site.url + "#/room/room-1")
    page.wait_for_selector("#host-chart svg")
    page.screenshot(path=str(OUT / f"room-{width}.png"), full_page=True)
    _no_overflow(page)
    page.locator(f"button.report[data-device='{CAM['key']}']").click()
    save = page.locator("#r-save").bounding_box()
    assert save is not None and save["x"] + save["width"] <= width and save["y"] + save["height"] <= height
    page.screenshot(path=str(OUT / f"report-dialog-{width}.png"))
    page.click("#report button[value=close]")

    page.goto(site.url + f"#/incident/{cam}")
    page.wait_for_selector("#inc-chart svg")
    page.screenshot(path=str(OUT / f"incident-{width}.png"), full_page=True)
    _no_overflow(page)

    page.goto(site.url + "#/incident/" + site.ids[SPK_B["key"]])
    page.wait_for_selector("#d-evidence")
    page.goto(site.url + "#/reports")
    page.wait_for_selector("#unit-report")
    page.wait_for_selector("#rates")
    page.screenshot(path=str(OUT / f"report-{width}.png"), full_page=True)
    _no_overflow(page)
    page.emulate_media(media="print")
    page.screenshot(path=str(OUT / f"report-print-{width}.png"), full_page=True)
    page.context.close()


@pytest.mark.parametrize("store", ["sqlite"])
def test_the_overview_fits_a_1280x720_screen(site: Site, browser: Any, store: str) -> None:
    """Counts, tabs, filters, a page of rooms or incidents and its pager in one screen; the table scrolls
    inside its box (its header stays), the page itself does not scroll."""
    from collector.ingest import Inbound
    from tests.builder import SPK, Agent

    lines: list[str] = []
    for n in range(40):  # a fleet whose page of rooms is taller than the screen
        a = Agent(f"ruang-{n:02d}", f"bootfleet{n:03d}", lines).started(devices=[CAM, SPK])
        a.error(5, CAM, "video.stream_error")
    for line in lines:
        rec = json.loads(line)
        site.collector.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    site.collector.tick()
    page = sign_in(browser, site, "ani")
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(site.url + "#/")
    for tab, box, rows in (("rooms", "#rooms-box", "#rooms tbody tr[data-agent]"),
                           ("incidents", "#inc-box", "#incidents tbody tr[data-id]")):
        page.click(f"#tab-{tab}")
        page.wait_for_selector(rows)
        page.wait_for_timeout(100)
        page.screenshot(path=str(OUT / f"overview-720-{tab}.png"))
        fit = page.evaluate(f"""() => {{ const b = document.querySelector("{box} .fit"),
            p = document.querySelector("{box} .pager").getBoundingClientRect();
            return {{page: document.documentElement.scrollHeight, inner: b.scrollHeight, shown: b.clientHeight,
                     pager: p.bottom}}; }}""")
        print(f"\n{tab} at 1280x720: {fit}")
        assert fit["page"] <= 720 and fit["pager"] <= 720, fit  # the whole overview in one screen
        assert fit["inner"] > fit["shown"], fit  # this page of rows is taller than its box: it scrolls inside
        last = page.locator(rows).last
        last.scroll_into_view_if_needed()
        assert last.is_visible() and page.evaluate("document.documentElement.scrollHeight") <= 720
    page.context.close()
