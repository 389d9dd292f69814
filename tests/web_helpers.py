"""Test helpers for the authenticated web API: accounts, a signed-in client, API tokens."""

from __future__ import annotations

from typing import Any

import httpx

from collector import users
from collector.store.sqlite import SqliteStore
from tests.builder import REGISTRY as BASE_REGISTRY
from tests.builder import device

PASSWORD = "kata-sandi-uji-1"
SPK_B = device("0b0e:2456:SPKB", "speakerphone", "3-1")


def add_user(store: SqliteStore, name: str, role: str, unit: str | None = None, password: str = PASSWORD) -> str:
    users.add(store, name, role, unit, password, "test")
    return password


def token_for(store: SqliteStore, name: str, role: str = "viewer", unit: str | None = None) -> str:
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
    """A collector with two units, each with a room PC and one incident: setjen's camera errors
    (device fault), BPSDM's speakerphone is pulled while in use and stays away (handling damage).
    room-1 also has an unregistered speakerphone (SPK), attributed to setjen through its room."""
    import json
    import time
    from pathlib import Path

    from collector.ingest import Collector, Inbound
    from collector.registry import load_toml
    from tests.builder import CAM, Agent

    store = SqliteStore(db)
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
