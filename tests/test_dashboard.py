"""The dashboard in a real browser (Debian's Chromium driven by Playwright): fleet and incident
tables, the Indonesian/English switch, the per-unit view, and an override from the dialog."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.ingest import Collector, Inbound
from collector.registry import load_toml
from collector.store.sqlite import SqliteStore
from collector.web.server import WebServer
from tests.builder import CAM, SPK, Agent
from tests.test_incidents import REGISTRY

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Collector]]:
    store = SqliteStore(str(tmp_path / "c.sqlite"))
    reg = tmp_path / "r.toml"
    reg.write_text(REGISTRY + '\n[[units]]\nid = "bpsdm"\nname = "BPSDM"\n')
    load_toml(store, str(reg))
    c = Collector(store)
    lines: list[str] = []
    a = Agent("room-1", "bootaaaa0001", lines).started()
    b = Agent("aula-bpsdm", "bootbbbb0001", lines)
    b.started()
    a.error(30, CAM, "video.stream_error")
    b.detach(30, SPK, in_use=True)
    b.telemetry(45, [])
    for line in lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    c.tick()
    store.db.execute("UPDATE agents SET labels = '{\"unit\": \"bpsdm\"}' WHERE agent = 'aula-bpsdm'")
    web = WebServer(c, "127.0.0.1", 0)
    web.start()
    yield web.address, c
    web.stop()
    store.close()


def test_dashboard_in_chromium(site: tuple[str, Collector], tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    from playwright.sync_api import sync_playwright

    url, collector = site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#incidents tbody tr[data-id]")
        rows = page.locator("#incidents tbody tr[data-id]")
        assert rows.count() == 2
        text = page.locator("#incidents").inner_text()
        assert "kerusakan perangkat" in text and "kerusakan penanganan" in text  # Indonesian by default
        assert "Sekretariat Jenderal" in text and "Budi" in text
        assert "room-1" in page.locator("#agents").inner_text()
        page.screenshot(path=str(tmp_path / "dashboard-id.png"), full_page=True)

        page.click("#lang")
        page.wait_for_function("document.querySelector('#incidents').innerText.includes('device fault')")
        assert "handling damage" in page.locator("#incidents").inner_text()

        page.select_option("#unit", "bpsdm")  # a PIC's view: only their unit
        page.wait_for_function("document.querySelectorAll('#incidents tbody tr[data-id]').length === 1")
        assert "aula-bpsdm" in page.locator("#incidents").inner_text()
        page.select_option("#unit", "")
        page.wait_for_function("document.querySelectorAll('#incidents tbody tr[data-id]').length === 2")

        cam_row = page.locator("#incidents tbody tr", has_text=CAM["key"])
        cam_row.locator("button.open-detail").click()
        page.wait_for_selector("#detail[open]")
        assert "device.error" in page.locator("#d-evidence").inner_text()
        assert "central IT's responsibility" in page.locator("#d-summary").inner_text()  # English now
        page.select_option("#d-cause", "handling_damage")
        page.fill("#d-reason", "kabel putus karena tertarik kursi")
        page.fill("#d-by", "ani (Pusdatin)")
        page.click("#d-save")
        page.wait_for_function("document.querySelector('#d-msg').innerText === 'Saved'")
        page.wait_for_function("document.querySelector('#d-history').innerText.includes('overridden')")
        page.screenshot(path=str(tmp_path / "dashboard-override.png"), full_page=True)
        page.click("#detail button[value=close]")

        answers = iter(["speaker ditarik saat rapat", "budi"])
        page.on("dialog", lambda d: d.accept(next(answers, None)) if d.type == "prompt" else d.accept())
        page.locator(f"button.report[data-device='{SPK['key']}'][data-agent='room-1']").click()
        browser_deadline = time.monotonic() + 10
        while time.monotonic() < browser_deadline and not collector.store.query(
                "SELECT 1 FROM evidence WHERE type = 'handling.reported'"):
            page.wait_for_timeout(100)
        browser.close()
    [rep] = collector.store.query("SELECT agent, device, payload FROM evidence WHERE type = 'handling.reported'")
    assert (rep["agent"], rep["device"]) == ("room-1", SPK["key"])
    assert json.loads(rep["payload"])["context"]["note"] == "speaker ditarik saat rapat"
    [row] = collector.store.query("SELECT * FROM incidents WHERE device = ?", (CAM["key"],))
    assert (row["cause"], row["decided_cause"], row["decided_by"]) == ("device_fault", "handling_damage",
                                                                      "ani (Pusdatin)")
    shutil.copy(tmp_path / "dashboard-id.png", "/tmp/pantau-dashboard-id.png")
    shutil.copy(tmp_path / "dashboard-override.png", "/tmp/pantau-dashboard-override.png")
