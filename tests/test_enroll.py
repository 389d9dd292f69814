"""Enrollment end to end against a real Mosquitto with its dynamic security plugin and the collector's
web server on HTTPS: `pantau-agent enroll` (a real process) fetches its configuration pinned to the
certificate; the account it gets publishes on its own topics only; disabling it drops its connection
and refuses it afterwards; used, expired, unknown tokens and a wrong fingerprint are refused with one
line and a non-zero exit, and every attempt is audited. The store's side of it (tokens, accounts, their end with
the lease) on both stores, without a broker."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import audit, enroll
from collector.store import Store
from common.config import parse_broker
from common.protocol import now_ts
from tests.conftest import ROOT
from tests.enroll_helpers import ADMIN, ADMIN_PW, Client, enroll_site, wait_for
from tests.web_helpers import token_for

pytestmark = pytest.mark.broker


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with enroll_site(tmp_path) as s:
        yield s


def agent_enroll(site: dict[str, Any], token: str, name: str = "agent.toml", fingerprint: str | None = None,
                 *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(site["dir"] / name), "enroll",
                           site["url"], token, "--fingerprint", fingerprint or site["fingerprint"],
                           "--state-dir", str(site["dir"] / "state"), *extra],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def audit_actions(store: Store) -> list[tuple[str, dict[str, Any]]]:
    return [(r["action"], json.loads(r["detail"])) for r in store.query("SELECT action, detail FROM audit ORDER BY id")]


def test_enroll_publishes_own_topics_only_then_disable_drops_it(site: dict[str, Any]) -> None:
    store, broker = site["store"], site["broker"]
    t = enroll.new_token(store, "setjen", "r1", 3600, "tester")
    assert t["agent_id"] == "room-1"  # the room's registered PC
    assert store.query("SELECT count(*) AS n FROM enroll_tokens WHERE id = ?", (t["token"],))[0]["n"] == 0  # hash only

    r = agent_enroll(site, t["token"])
    assert r.returncode == 0, r.stderr
    assert "enrolled as room-1 (unit setjen, room r1)" in r.stdout
    path = site["dir"] / "agent.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = tomllib.loads(path.read_text())
    assert cfg["agent_id"] == cfg["username"] == "room-1"
    assert cfg["labels"] == {"unit": "setjen", "room": "r1"} and cfg["broker"] == broker.url
    from agent.config import load as load_agent

    assert load_agent(str(path), env={}).agent_id == "room-1"  # the agent reads what enroll wrote

    watcher = Client(broker.url, ADMIN, ADMIN_PW)  # the admin role receives everything
    watcher.c.subscribe("pantau/#", qos=1)
    time.sleep(0.3)
    agent = Client(broker.url, cfg["username"], cfg["password"])
    assert agent.connack.value == 0
    assert agent.publish("pantau/v1/agents/room-1/state", "mine") == 0
    assert agent.publish("pantau/v1/agents/aula-bpsdm/state", "theirs") == 135  # not authorized
    assert wait_for(lambda: ("pantau/v1/agents/room-1/state", b"mine") in watcher.got)
    time.sleep(0.3)
    assert [t for t, _ in watcher.got] == ["pantau/v1/agents/room-1/state"]

    # disabling: the broker drops the live connection, and refuses it from then on
    c = subprocess.run([sys.executable, "-m", "collector.cli", "agent", "disable", "room-1", "--reason", "lease ended"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PANTAU_DB": str(site["dir"] / "pantau.sqlite"),
                            "PANTAU_DYNSEC_USERNAME": ADMIN, "PANTAU_DYNSEC_PASSWORD": ADMIN_PW,
                            "PANTAU_BROKER": broker.url})
    assert c.returncode == 0, c.stderr
    assert c.stdout.strip() == "disabled room-1"
    assert wait_for(lambda: agent.disconnects), "the broker kept the disabled agent connected"
    agent.close()
    again = Client(broker.url, cfg["username"], cfg["password"])
    assert again.connack.value == 135
    again.close()
    watcher.close()
    acts = [a for a, _ in audit_actions(store)]
    assert acts == ["enroll.token_created", "agent.enrolled", "agent.disabled"]
    assert store.query("SELECT disabled_reason FROM agent_accounts")[0]["disabled_reason"] == "lease ended"


def test_used_expired_unknown_tokens_and_wrong_fingerprint_are_refused(site: dict[str, Any]) -> None:
    store = site["store"]
    t = enroll.new_token(store, "bpsdm", "aula", 3600, "tester")
    assert agent_enroll(site, t["token"]).returncode == 0

    used = agent_enroll(site, t["token"], "second.toml")
    assert used.returncode == 2 and used.stderr.count("\n") == 1
    assert "used already" in used.stderr and not (site["dir"] / "second.toml").exists()

    old = enroll.new_token(store, "bpsdm", "aula", 3600, "tester")
    with store.tx() as db:  # an hour passes twice
        db.execute("UPDATE enroll_tokens SET expires_at = ? WHERE used_at IS NULL", (time.time() - 1,))
    expired = agent_enroll(site, old["token"], "third.toml")
    assert expired.returncode == 2 and "expired at" in expired.stderr and expired.stderr.count("\n") == 1

    unknown = agent_enroll(site, "pe_" + "x" * 43, "fourth.toml")
    assert unknown.returncode == 2 and "unknown enrollment token" in unknown.stderr

    fresh = enroll.new_token(store, "bpsdm", "aula", 3600, "tester")
    wrong = agent_enroll(site, fresh["token"], "fifth.toml", "AB:" * 31 + "CD")
    assert wrong.returncode == 2 and "does not match the fingerprint" in wrong.stderr
    assert "token was not sent" in wrong.stderr
    assert store.query("SELECT used_at FROM enroll_tokens WHERE agent = 'aula-bpsdm' ORDER BY created_at DESC "
                       "LIMIT 1")[0]["used_at"] is None  # still good: it never left the PC

    refused = [d["reason"] for a, d in audit_actions(store) if a == "enroll.refused"]
    assert len(refused) == 3
    assert "used already" in refused[0] and "expired" in refused[1] and refused[2] == "unknown enrollment token"
    assert audit.verify(store.db)[1] is None  # the chain holds


def test_broker_down_leaves_the_token_good(site: dict[str, Any]) -> None:
    store = site["store"]
    t = enroll.new_token(store, "setjen", "r1", 3600, "tester")
    site["broker"].stop()
    r = agent_enroll(site, t["token"])
    assert r.returncode == 2 and "could not create the broker account" in r.stderr
    site["broker"].start()
    r = agent_enroll(site, t["token"])
    assert r.returncode == 0, r.stderr


def test_operator_api_creates_tokens_and_room_pc_needs_no_account(site: dict[str, Any]) -> None:
    import httpx

    store = site["store"]
    op = token_for(store, "ops", "operator")
    pic = token_for(store, "budi", "pic", "setjen")
    with httpx.Client(base_url=site["url"], verify=False, timeout=30) as h:
        refused = h.post("/api/enroll/tokens", json={"unit": "setjen", "room": "r1"},
                         headers={"Authorization": f"Bearer {pic}"})
        assert refused.status_code == 403
        bad = h.post("/api/enroll/tokens", json={"unit": "setjen", "room": "aula"},
                     headers={"Authorization": f"Bearer {op}"})
        assert bad.status_code == 400 and "belongs to unit 'bpsdm'" in bad.json()["error"]
        made = h.post("/api/enroll/tokens", json={"unit": "setjen", "room": "r1", "expires": "2h"},
                      headers={"Authorization": f"Bearer {op}"})
        assert made.status_code == 200, made.text
        body = made.json()
        assert body["fingerprint"] == site["fingerprint"] and body["collector"] == site["url"]
        assert f"{site['url']}/install.sh | sudo sh -s -- {body['token']}" in body["commands"]["linux"]
        assert "--pinnedpubkey sha256//" in body["commands"]["linux"]
        # the room PC: no account, no cookie; the token is the credential
        got = h.post("/enroll", json={"token": body["token"]})
        assert got.status_code == 200 and got.json()["agent_id"] == "room-1" and got.json()["password"]
        again = h.post("/enroll", json={"token": body["token"]})
        assert again.status_code == 403 and "used already" in again.json()["error"]
        script = h.get("/install.sh")
        assert script.status_code == 200 and site["fingerprint"] in script.text
        assert h.get("/enroll/bundle/index.txt").status_code == 404  # no bundle built in this test
        assert h.get("/enroll/bundle/..%2Fpantau.sqlite").status_code == 404
        assert h.get("/api/enroll/accounts").status_code == 401


def test_shell_installer_is_valid_sh(site: dict[str, Any]) -> None:
    from collector.bundle import install_sh

    script = site["dir"] / "install.sh"
    script.write_text(install_sh(site["url"], site["fingerprint"]))
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("install.sh: no token")


def test_the_unit_enroll_installs_is_the_shipped_one() -> None:
    from agent.enroll import unit_text

    shipped = (ROOT / "deploy" / "systemd" / "pantau-agent.service").read_text()
    assert unit_text("/opt/pantau-agent/bin/pantau-agent", "/etc/pantau/agent.toml", "/var/lib/pantau-agent") == shipped


def test_what_the_collector_sends_is_checked_before_it_is_written(tmp_path: Path) -> None:
    from agent.enroll import EnrollFailed, parse_fingerprint, render_config, write_files

    hostile = "a\"b\\c\nd\x7fe\x00f ' = [x]"
    good = {"agent_id": "room-1", "broker": "mqtts://b.example:8883", "username": "room-1", "password": hostile,
            "labels": {"unit": "setjen", "room": hostile}, "prefix": "pantau"}
    cfg = tomllib.loads(render_config(good, None, "/var/lib/pantau-agent"))
    assert cfg["password"] == hostile and cfg["labels"]["room"] == hostile and cfg["agent_id"] == "room-1"
    for bad, why in ((dict(good, agent_id="../etc"), "agent id"), (dict(good, broker="http://x"), "broker"),
                     (dict(good, labels={"a b": "x"}), "labels"), (dict(good, password=5), "non-text"),
                     (dict(good, agent_id=None), "agent id")):
        with pytest.raises(EnrollFailed, match=why):
            render_config(bad, None, "/s")
    with pytest.raises(EnrollFailed, match="PEM"):
        write_files(dict(good, ca="not a certificate"), str(tmp_path / "a.toml"), "/s")
    assert not (tmp_path / "a.toml").exists()
    assert parse_fingerprint("SHA256:" + "ab:" * 31 + "CD") == bytes.fromhex("ab" * 31 + "cd")
    for bad_fp in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(EnrollFailed, match="64 hex digits"):
            parse_fingerprint(bad_fp)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PANTAU_DB": str(tmp_path / "p.sqlite")}
    audit.configure(str(tmp_path / "p.sqlite"))  # its key exists already (its creation is logged once)
    for args, expect in ((["enroll", "--unit", "nope", "--room", "r1"], "unit 'nope' is not in the registry"),
                         (["enroll", "--unit", "x", "--room", "y", "--expires", "forever"], "give a duration"),
                         (["agent", "disable", "room-1"], "manages no broker accounts"),
                         (["agent", "disable", "BAD ID"], "1-64 characters")):
        r = subprocess.run([sys.executable, "-m", "collector.cli", *args], capture_output=True, text=True,
                           timeout=60, cwd=ROOT, env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(tmp_path / "a.toml"), "enroll",
                        "http://127.0.0.1:1", "pe_x", "--fingerprint", "AB" * 32], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "must look like https://" in r.stderr and r.stderr.count("\n") == 1


class FakeDynsec:
    """The broker side of enrollment, remembered in memory: the store side runs without a broker (the tests
    above run it against a real one)."""

    def __init__(self) -> None:
        self.broker = parse_broker("mqtt://127.0.0.1:1883")
        self.username = ADMIN
        self.enabled: dict[str, bool] = {}

    def ensure_agent(self, agent_id: str, password: str, prefix: str = "pantau") -> None:
        self.enabled[agent_id] = True

    def disable_agent(self, agent_id: str) -> bool:
        known = agent_id in self.enabled
        if known:
            self.enabled[agent_id] = False
        return known

    def enable_agent(self, agent_id: str) -> bool:
        known = agent_id in self.enabled
        if known:
            self.enabled[agent_id] = True
        return known


def test_tokens_accounts_and_lease_ends_on_each_store(tmp_path: Path, store_db: str) -> None:
    """Enrollment's records on both stores: a token is stored as its hash and works once until it expires;
    the account it makes is disabled by the last loan of its room ending and enabled by a new one, over the
    API too; every step is in an intact audit chain."""
    import httpx

    from collector import leases, registry
    from collector.ingest import Collector
    from collector.registry import load_toml
    from collector.web.server import WebServer
    from tests.web_helpers import REGISTRY, open_test_store

    store = open_test_store(store_db, tmp_path)
    (tmp_path / "r.toml").write_text(REGISTRY)
    load_toml(store, str(tmp_path / "r.toml"))
    broker = FakeDynsec()
    settings = enroll.EnrollSettings(dynsec=broker)  # type: ignore[arg-type]
    enroll.configure(settings)
    web = WebServer(Collector(store, classify=False), "127.0.0.1", 0)
    web.start()
    try:
        t = enroll.new_token(store, "setjen", "r1", 3600, "tester")
        assert store.query("SELECT count(*) AS n FROM enroll_tokens WHERE id = ?", (t["token"],))[0]["n"] == 0
        cfg = enroll.redeem(store, settings, t["token"], "10.0.0.5")
        assert cfg["agent_id"] == "room-1" and broker.enabled == {"room-1": True}
        with pytest.raises(enroll.EnrollError, match="used already"):
            enroll.redeem(store, settings, t["token"], "10.0.0.5")
        old = enroll.new_token(store, "bpsdm", "aula", 3600, "tester")
        with store.tx() as db:
            db.execute("UPDATE enroll_tokens SET expires_at = ? WHERE used_at IS NULL", (time.time() - 1,))
        with pytest.raises(enroll.EnrollError, match="expired at"):
            enroll.redeem(store, settings, old["token"], "10.0.0.6")
        [acct] = enroll.accounts(store)
        assert (acct["agent"], acct["unit"], acct["room"], acct["disabled_at"]) == ("room-1", "setjen", "r1", None)

        # the camera, r1's only loan, comes back: the account ends with the lease; a new loan gives it back
        leases.record_return(store, "046d:085e:CAM1", "ops")  # its sweep ends the account at once
        assert broker.enabled["room-1"] is False and enroll.accounts(store)[0]["disabled_reason"] == "lease ended"
        assert leases.lease_accounts(store, settings) == {"disabled": [], "enabled": []}  # once
        registry.update_loan(store, "046d:085e:CAM1", {"lease_start": "2099-01-01", "lease_end": "2099-12-31"}, "ops",
                             now_ts())
        assert leases.lease_accounts(store, settings)["enabled"] == ["room-1"]
        assert enroll.accounts(store)[0]["disabled_at"] is None and broker.enabled["room-1"] is True

        op = token_for(store, "ops", "operator")
        with httpx.Client(base_url=web.address, timeout=30, headers={"Authorization": f"Bearer {op}"}) as h:
            made = h.post("/api/enroll/tokens", json={"unit": "bpsdm", "room": "aula", "expires": "2h"})
            assert made.status_code == 200 and made.json()["agent_id"] == "aula-bpsdm"
            r = h.post("/api/agents/room-1/disable", json={"reason": "PC diganti"})
            assert r.status_code == 200, r.text
            assert [a["agent"] for a in h.get("/api/enroll/accounts").json()] == ["room-1"]
        assert enroll.accounts(store)[0]["disabled_reason"] == "PC diganti"
        assert [a for a, _ in audit_actions(store)] == [
            "enroll.token_created", "agent.enrolled", "enroll.refused", "enroll.token_created", "enroll.refused",
            "loan.returned", "agent.disabled", "loan.updated", "agent.enabled", "user.added", "token.created",
            "enroll.token_created", "agent.disabled"]
        assert audit.verify(store.db)[1] is None
    finally:
        web.stop()
        enroll.configure(None)
        store.close()
