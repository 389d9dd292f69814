"""Test helpers for the authenticated web API: accounts, a signed-in client, API tokens, and the site the
dashboard's Chromium tests sign in to."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from collector import audit, users
from collector.ingest import Collector, Inbound
from collector.store import Retention, Store, is_postgres, open_store
from collector.web.server import WebServer
from tests.builder import REGISTRY as BASE_REGISTRY
from tests.builder import Agent, device

PASSWORD = "kata-sandi-uji-1"
SPK_B = device("0b0e:2456:SPKB", "speakerphone", "3-1")


def open_test_store(db: str, key_dir: str | Path, retention: Retention | None = None) -> Store:
    """A store of either kind: a SQLite file, or a PostgreSQL database (``postgresql://...``), whose audit
    chain's key is then ``key_dir/audit.key`` (a server has no folder to keep it beside)."""
    if is_postgres(db):
        audit.configure(db, os.path.join(str(key_dir), "audit.key"))
    return open_store(db, retention)


def add_user(store: Store, name: str, role: str, unit: str | None = None, password: str = PASSWORD) -> str:
    users.add(store, name, role, unit, password, "test")
    return password


def token_for(store: Store, name: str, role: str = "viewer", unit: str | None = None) -> str:
    """An API token of a (new) account ``name`` for scripts and tests: ``Authorization: Bearer ...``."""
    if not store.query("SELECT 1 FROM users WHERE name = ?", (name,)):
        users.add(store, name, role, unit, None, "test")
    return users.new_token(store, name, "test", "test")


class Browser:
    """A signed-in session the way the dashboard holds one: cookie plus the page's CSRF token."""

    def __init__(self, base: str, name: str, password: str = PASSWORD) -> None:
        self.base = base.rstrip("/")
        self.client = httpx.Client(base_url=self.base, timeout=10)
        r = self.client.post("/api/login", json={"username": name, "password": password},
                             headers={"Origin": self.base})
        assert r.status_code == 200, r.text
        self.csrf: str = r.json()["csrf"]
        self.login_response = r

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf, "Origin": self.base, **kw.pop("headers", {})}
        return self.client.post(path, json=body, headers=headers, **kw)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


REGISTRY = BASE_REGISTRY + """
[[units]]
id = "bpsdm"
name = "BPSDM"
pic = { name = "Citra", email = "citra@bpsdm.example" }
rooms = [{ id = "aula", name = "Aula", agent = "aula-bpsdm" }]

[[units.devices]]
key = "0b0e:2456:SPKB"
room = "aula"
condition = "baru"
"""


def build_site(db: str, registry_file: str) -> Any:
    """On the store ``db`` names (a SQLite file or a PostgreSQL database), a collector with two units, each
    with a room PC and one incident: setjen's camera errors (device fault), BPSDM's speakerphone is pulled
    while in use and stays away (handling damage). room-1 also has an unregistered speakerphone (SPK),
    attributed to setjen through its room."""
    import json
    import time
    from pathlib import Path

    from collector.ingest import Collector, Inbound
    from collector.registry import load_toml
    from tests.builder import CAM, Agent

    store = open_test_store(db, os.path.dirname(registry_file))
    Path(registry_file).write_text(REGISTRY)
    load_toml(store, registry_file)
    c = Collector(store)
    lines: list[str] = []
    a = Agent("room-1", "bootaaaa0001", lines).started()
    b = Agent("aula-bpsdm", "bootbbbb0001", lines)
    b.started(devices=[SPK_B])
    a.error(30, CAM, "video.stream_error")
    b.detach(30, SPK_B, in_use=True)
    b.telemetry(45, [])
    for line in lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
    c.tick()
    return c


# ---------------------------------------------------------------- the dashboard in Chromium

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
XSS = {"product": "<img src=x onerror=window.__xss=1>", "vendor": "<script>window.__xss=2</script>",
       "serial": "\"><img src=x onerror=window.__xss=3>"}
EVIL = device(f"1234:5678:{XSS['serial']}", "camera", "1-4", product=XSS["product"], vendor=XSS["vendor"],
              serial=XSS["serial"])


class Site:
    def __init__(self, tmp: Path, db: str | None = None) -> None:
        self.collector: Collector = build_site(db or str(tmp / "c.sqlite"), str(tmp / "r.toml"))
        store = self.store = self.collector.store
        lines: list[str] = []
        x = Agent("ruang-xss", "bootxxxx0001", lines).started(devices=[EVIL])  # labels: setjen
        x.error(31, EVIL, "video.stream_error")
        for line in lines:
            rec = json.loads(line)
            self.collector.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])
        self.collector.tick()
        with store.tx() as db:
            db.execute("UPDATE agents SET clock = '2026-11-30T01:05:00.000Z', clock_offset_s = -300 "
                       "WHERE agent = 'room-1'")
            db.execute("UPDATE agents SET clock_offset_s = 2.5 WHERE agent = 'aula-bpsdm'")
        for name, role, unit in (("root", "admin", None), ("ani", "operator", None), ("citra", "pic", "bpsdm"),
                                 ("dewi", "viewer", None)):
            add_user(store, name, role, unit)
        self.web = WebServer(self.collector, "127.0.0.1", 0)
        self.web.start()
        self.url = self.web.address
        self.ids = {r["device"]: r["id"] for r in store.query("SELECT id, device FROM incidents")}


def sign_in(browser: Any, site: Site, name: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(site.url)
    page.wait_for_url("**/login")
    page.fill("#username", name)
    page.fill("#password", PASSWORD)
    page.click("#login button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")
    return page
