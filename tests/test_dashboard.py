"""The dashboard in a real browser (Debian's Chromium driven by Playwright), signed in as each role:
what each sees and may do; USB-supplied strings shown as text, never run; a PC with a wrong clock
flagged; the Indonesian/English switch; and a hostile page on another origin that gets nothing done."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.builder import CAM, SPK
from tests.web_helpers import EVIL, SPK_B, XSS, Site, sign_in


def incident_rows(page: Any) -> set[str]:
    return set(page.eval_on_selector_all("#incidents tbody tr[data-id]", "rs => rs.map(r => r.dataset.id)"))


def tab(page: Any, name: str) -> None:
    """The overview shows rooms or incidents (both fit a screen): pick one, wait for its rows."""
    page.click(f"#tab-{name}")
    page.wait_for_selector("#rooms tbody tr[data-agent]" if name == "rooms" else "#incidents tbody tr[data-id]")


def open_incident(page: Any, iid: str) -> None:
    tab(page, "incidents")
    page.locator(f"#incidents tr[data-id='{iid}'] a").first.click()
    page.wait_for_selector("#d-evidence")


def test_each_role_in_chromium(site: Site, browser: Any, tmp_path: Path) -> None:
    cam, spk_b, evil = site.ids[CAM["key"]], site.ids[SPK_B["key"]], site.ids[EVIL["key"]]
    wrong = browser.new_context().new_page()
    wrong.goto(site.url + "login")
    wrong.fill("#username", "ani")
    wrong.fill("#password", "bukan-sandinya")
    wrong.click("#login button[type=submit]")
    wrong.wait_for_function("() => document.querySelector('#msg').innerText.includes('wrong')")

    # -- viewer: reads everything, changes nothing; USB strings are text; the wrong clock is flagged
    page = sign_in(browser, site, "dewi")
    tab(page, "incidents")
    assert incident_rows(page) == {cam, spk_b, evil}
    assert XSS["serial"] in page.locator("#incidents").inner_text()
    tab(page, "rooms")
    assert XSS["product"] in page.locator("#rooms").inner_text()
    assert page.evaluate("window.__xss") is None  # the CSP would stop inline handlers too: so also
    assert page.locator("#rooms img, #incidents img, main script").count() == 0  # no element was made
    assert page.locator("#rooms tr[data-agent='room-1'] .clock-off").count() == 1
    assert page.locator("#rooms tr[data-agent='aula-bpsdm'] .clock-off").count() == 0
    # pulled while in use: missing at once, on the overview, with its key and status readable
    chip = page.locator(f"#rooms .dev[data-key='{SPK_B['key']}']")
    assert chip.get_attribute("data-status") == "missing" and "dicabut saat dipakai" in chip.inner_text()
    assert page.locator(f"#rooms .dev[data-key='{CAM['key']}']").get_attribute("data-status") == "error"
    assert page.locator("button.report").count() == 0
    page.goto(site.url + "#/room/ruang-xss")
    page.wait_for_selector("article.device")
    assert XSS["vendor"] in page.locator("main").inner_text() and page.evaluate("window.__xss") is None
    page.goto(site.url + "#/")
    open_incident(page, evil)
    assert XSS["serial"] in page.locator("#d-title").inner_text() and page.evaluate("window.__xss") is None
    assert not page.locator("#d-override").is_visible() and not page.locator("#d-ack").is_visible()
    assert not page.locator("#d-comment-box").is_visible()
    forged = page.evaluate("""async (id) => {
        const me = await (await fetch('/api/me')).json();
        const r = await fetch('/api/incidents/' + id + '/override', {method: 'POST',
            body: JSON.stringify({cause: 'host_issue', reason: 'x'}),
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf}});
        return r.status; }""", cam)
    assert forged == 403
    page.context.close()

    # -- PIC of BPSDM: only their unit, whatever they ask; may comment and report handling, not override
    page = sign_in(browser, site, "citra")
    tab(page, "incidents")
    assert incident_rows(page) == {spk_b}
    assert page.eval_on_selector_all("#rooms tbody tr", "rs => rs.map(r => r.dataset.agent)") == ["aula-bpsdm"]
    assert not page.locator("#unit-box").is_visible()
    got = page.evaluate("async (id) => (await fetch('/api/incidents/' + id)).status", cam)
    assert got == 404
    open_incident(page, spk_b)
    assert not page.locator("#d-override").is_visible() and page.locator("#d-comment-box").is_visible()
    assert "zoom" in page.locator("#d-evidence").inner_text()  # the apps that held it when it was pulled
    page.fill("#d-comment", "speaker ditarik saat rapat, akan diganti")
    page.click("#d-comment-save")
    page.wait_for_function("() => document.querySelector('#d-history').innerText.includes('citra: dikomentari')")
    page.locator(f"button.report[data-device='{SPK_B['key']}']").click()
    assert "24 jam" in page.locator("#report .warning").inner_text()  # what a report means (D1)
    page.fill("#r-note", "jatuh dari meja")
    page.click("#r-save")
    assert page.locator("#r-msg").inner_text() == "Saya mengerti dan ingin mencatat laporan ini"  # not yet
    page.check("#r-confirm")
    page.click("#r-save")
    page.wait_for_function("() => document.querySelector('#r-msg').innerText.startsWith('Laporan tercatat')")
    page.click("#report button[value=close]")
    page.context.close()

    # -- operator: the language switch, the unit filter, override and acknowledge
    page = sign_in(browser, site, "ani")
    tab(page, "incidents")
    text = page.locator("#incidents").inner_text()
    assert "Kerusakan perangkat" in text and "Kerusakan karena penanganan" in text  # Indonesian by default
    assert "Sekretariat Jenderal" in text and "Budi" in text
    page.click("#lang")
    page.wait_for_function("() => (document.querySelector('#incidents') || {innerText: ''}).innerText"
                           ".includes('Device fault')")
    page.select_option("#unit", "bpsdm")
    page.wait_for_function("() => document.querySelectorAll('#incidents tbody tr[data-id]').length === 1")
    page.select_option("#unit", "")
    page.wait_for_function("() => document.querySelectorAll('#incidents tbody tr[data-id]').length === 3")
    open_incident(page, cam)
    ev = page.locator("#d-evidence").inner_text()
    assert "video.stream_error" in ev and "error" in ev
    assert "central IT's responsibility" in page.locator("#d-summary").inner_text()
    assert "policy" in page.locator("#d-rule").inner_text()
    page.select_option("#d-cause", "handling_damage")
    page.fill("#d-reason", "kabel putus karena tertarik kursi")
    page.click("#d-save")
    page.wait_for_function("() => document.querySelector('#d-history').innerText.includes('ani: overridden')")
    decided = page.locator("#d-decided").inner_text()
    assert "Handling damage" in decided and "ani" in decided and "kabel putus" in decided
    assert "Device fault" in page.locator("#d-computed").inner_text()  # the computed cause is kept beside it
    page.click("#d-ack")
    page.wait_for_function("() => document.querySelector('#d-history').innerText.includes('ani: Acknowledged')")
    assert not page.locator("#d-ack").is_visible()
    page.goto(site.url + "#/")
    tab(page, "rooms")
    page.locator(f"button.report[data-device='{SPK['key']}'][data-agent='room-1']").click()
    page.fill("#r-note", "speaker ditarik saat rapat")
    page.check("#r-confirm")
    page.click("#r-save")
    page.wait_for_function("() => document.querySelector('#r-msg').innerText.startsWith('Report recorded')")
    page.context.close()

    # -- admin: everything, then sign out
    page = sign_in(browser, site, "root")
    tab(page, "incidents")
    assert incident_rows(page) == {cam, spk_b, evil} and page.locator("#who").inner_text().startswith("root")
    page.click("#logout")
    page.wait_for_url("**/login")
    page.goto(site.url)
    page.wait_for_url("**/login")
    page.context.close()

    [row] = site.store.query("SELECT * FROM incidents WHERE id = ?", (cam,))
    assert (row["cause"], row["decided_cause"], row["decided_by"], row["acknowledged_by"]) == (
        "device_fault", "handling_damage", "ani", "ani")
    reports = site.store.query("SELECT agent, device, payload FROM evidence WHERE type = 'handling.reported' "
                               "ORDER BY id")
    assert [(r["agent"], r["device"], json.loads(r["payload"])["context"]["reported_by"]) for r in reports] == [
        ("aula-bpsdm", SPK_B["key"], "citra"), ("room-1", SPK["key"], "ani")]


class _Evil(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>hadiah</title><p>Selamat!</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: Any) -> None:
        pass


def test_a_page_on_another_origin_gets_nothing_done(site: Site, browser: Any) -> None:
    cam = site.ids[CAM["key"]]
    before = site.store.query("SELECT count(*) AS n FROM audit")[0]["n"]
    evil = ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page = sign_in(browser, site, "root")  # the victim is signed in, in the same browser
        target = site.url.rstrip("/")
        page.goto(f"http://localhost:{evil.server_address[1]}/")  # another origin (and another site)
        statuses = page.evaluate("""async ([target, id]) => {
            const out = [];
            for (const [ctype, body] of [['text/plain', '{"cause":"host_issue","reason":"x"}'],
                                         ['application/x-www-form-urlencoded', 'cause=host_issue&reason=x']]) {
              try {
                const r = await fetch(target + '/api/incidents/' + id + '/override', {method: 'POST',
                    mode: 'no-cors', credentials: 'include', headers: {'Content-Type': ctype}, body});
                out.push(r.type);
              } catch (e) { out.push('error'); }
            }
            try {
              await fetch(target + '/api/incidents/' + id + '/ack', {method: 'POST', credentials: 'include',
                  headers: {'Content-Type': 'application/json'}, body: '{}'});
              out.push('sent');
            } catch (e) { out.push('blocked'); }
            return out; }""", [target, cam])
        assert statuses[-1] == "blocked"  # the JSON request needs a CORS preflight, which is not granted
        page.evaluate("""([target, id]) => { const f = document.createElement('form'); f.method = 'POST';
            f.enctype = 'text/plain'; f.action = target + '/api/incidents/' + id + '/ack';
            const i = document.createElement('input'); i.name = '{"a":"'; i.value = '"}'; f.appendChild(i);
            document.body.appendChild(f); f.submit(); }""", [target, cam])
        page.wait_for_load_state()
        time.sleep(0.5)
        page.context.close()
    finally:
        evil.shutdown()
        evil.server_close()
    [row] = site.store.query("SELECT decided_cause, acknowledged_by FROM incidents WHERE id = ?", (cam,))
    assert row == {"decided_cause": None, "acknowledged_by": None}
    assert site.store.query("SELECT count(*) AS n FROM audit")[0]["n"] == before
