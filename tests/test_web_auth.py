"""Who may do what, tried as a hostile user would: every state-changing request without credentials,
from a foreign Origin with a valid session, and as text/plain; a PIC reaching for another unit;
roles; sign-in cookies, rate limits, tokens, the proxy header; headers, /healthz and /metrics. On both stores."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector import users
from collector.ingest import Collector
from collector.web.server import WebServer
from collector.web.settings import WebSettings
from tests.builder import CAM, SPK
from tests.conftest import run_cli
from tests.web_helpers import PASSWORD, SPK_B, Browser, add_user, build_site, token_for

FOREIGN = "https://evil.example"


class Site:
    def __init__(self, tmp: Path, settings: WebSettings | None = None, db: str | None = None) -> None:
        self.collector: Collector = build_site(db or str(tmp / "c.sqlite"), str(tmp / "r.toml"))
        self.store = self.collector.store
        for name, role, unit in (("root", "admin", None), ("ani", "operator", None), ("budi", "pic", "setjen"),
                                 ("citra", "pic", "bpsdm"), ("dewi", "viewer", None)):
            add_user(self.store, name, role, unit)
        self.reasons: list[str] = []
        self.web = WebServer(self.collector, "127.0.0.1", 0, health=lambda: list(self.reasons),
                             settings=settings or WebSettings(registry_path=str(tmp / "r.toml")))
        self.web.start()
        self.base = self.web.address.rstrip("/")
        ids = {r["device"]: r["id"] for r in self.store.query("SELECT id, device FROM incidents")}
        self.cam_incident, self.spk_incident = ids[CAM["key"]], ids[SPK_B["key"]]

    def stop(self) -> None:
        self.web.stop()
        self.store.close()


@pytest.fixture
def site(tmp_path: Path, store_db: str) -> Iterator[Site]:
    s = Site(tmp_path, db=store_db)
    yield s
    s.stop()


def _state(site: Site) -> Any:
    q = site.store.query
    return (q("SELECT count(*) AS n FROM audit")[0]["n"], q("SELECT * FROM incidents ORDER BY id"),
            q("SELECT * FROM loans ORDER BY device"), q("SELECT name, disabled FROM users ORDER BY name"),
            q("SELECT count(*) AS n FROM evidence")[0]["n"], q("SELECT count(*) AS n FROM tokens")[0]["n"])


def _writes(site: Site) -> list[tuple[str, dict[str, Any]]]:
    """Every state-changing route of the app, with a body that would succeed for an admin."""
    bodies = {
        "/api/incidents/{id}/override": {"cause": "host_issue", "reason": "uji"},
        "/api/incidents/{id}/ack": {},
        "/api/incidents/{id}/comment": {"text": "uji"},
        "/api/handling": {"agent": "room-1", "device": CAM["key"], "note": "jatuh"},
        "/api/loans": {"device": "1111:2222:NEW", "unit": "setjen"},
        "/api/registry/reload": {},
        "/api/users": {"name": "eko", "role": "viewer", "password": PASSWORD},
        "/api/users/{name}/disable": {},
        "/api/users/{name}/tokens": {"label": "x"},
        "/api/logout": {},
        "/api/login": {"username": "root", "password": PASSWORD},
        "/api/loans/{device}/return": {},
        "/api/enroll/tokens": {"unit": "setjen", "room": "r1"},
        "/api/agents/{agent}/disable": {"reason": "uji"},
        "/enroll": {"token": "pe_uji"},
    }
    out = []
    for route, methods in site.web.app.openapi()["paths"].items():  # every route, from the code itself
        if set(methods) & {"post", "put", "patch", "delete"}:
            assert set(methods) <= {"post", "get"}, f"{route}: a method this test does not send"
            assert route in bodies, f"a new state-changing route needs a case here: {route}"
            path = route.replace("{id}", site.cam_incident).replace("{name}", "dewi").replace(
                "{device}", CAM["key"]).replace("{agent}", "room-1")
            out.append((path, bodies[route]))
    assert len(out) == len(bodies)
    return out


def test_every_state_changing_request_is_refused_without_identity_same_origin_and_json(site: Site) -> None:
    before = _state(site)
    anon = httpx.Client(base_url=site.base, timeout=10)
    with Browser(site.base, "root") as admin:
        for path, body in _writes(site):
            text = json.dumps(body)
            if path not in ("/api/login", "/enroll"):  # those two take their credential in the body
                # no credentials at all: JSON, text/plain, form
                assert anon.post(path, json=body).status_code == 401, path
                assert anon.post(path, content=text, headers={"Content-Type": "text/plain"}).status_code == 401
                assert anon.post(path, data={"x": "1"}).status_code == 401, path
            ok = {"X-CSRF-Token": admin.csrf}
            # a valid session, the right CSRF token even, from a foreign site
            r = admin.client.post(path, content=text, headers={**ok, "Content-Type": "application/json",
                                                                 "Origin": FOREIGN})
            assert r.status_code == 403, (path, r.text)
            r = admin.client.post(path, content=text, headers={**ok, "Content-Type": "application/json",
                                                                 "Sec-Fetch-Site": "cross-site"})
            assert r.status_code == 403, (path, r.text)
            assert admin.client.post(path, content=text, headers={**ok, "Content-Type": "application/json",
                                                                    "Origin": "null"}).status_code == 403
            # same site, valid session, but a simple (CORS-free) content type
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
                r = admin.client.post(path, content=text, headers={**ok, "Content-Type": ctype, "Origin": site.base})
                assert r.status_code == 403, (path, ctype, r.text)
            if path != "/api/login":
                # same site, JSON, but without (or with a wrong) CSRF token
                assert admin.client.post(path, json=body, headers={"Origin": site.base}).status_code == 403
                assert admin.client.post(path, json=body, headers={"Origin": site.base,
                                                                   "X-CSRF-Token": "guess"}).status_code == 403
        assert admin.get("/api/me").status_code == 200  # the session itself still works
    assert _state(site) == before  # and nothing changed


def test_a_pic_sees_and_touches_only_their_unit(site: Site) -> None:
    with Browser(site.base, "citra") as pic:  # BPSDM
        for q in ("", "?unit=setjen", "?all=1", "?status=open", "?unit="):
            rows = pic.get("/api/incidents" + q).json()
            assert [r["id"] for r in rows] == [site.spk_incident], q
            assert [a["agent"] for a in pic.get("/api/agents" + q).json()] == ["aula-bpsdm"], q
            assert {r["unit"] for r in pic.get("/api/loans" + q).json()} == {"bpsdm"}
            assert [r["id"] for r in pic.get("/api/rooms" + q).json()] == ["aula"]
        assert [u["id"] for u in pic.get("/api/units").json()] == ["bpsdm"]
        # another unit's incident, device or room by id: as if it did not exist
        r = pic.get(f"/api/incidents/{site.cam_incident}")
        assert r.status_code == 404 and r.json() == {"error": f"no incident {site.cam_incident}"}
        assert pic.get("/api/incidents/does-not-exist").status_code == 404
        assert pic.get(f"/api/loans/{CAM['key']}").status_code == 404
        assert pic.get(f"/api/loans/{SPK_B['key']}").status_code == 200
        assert pic.post(f"/api/incidents/{site.cam_incident}/comment", {"text": "x"}).status_code == 404
        assert pic.post("/api/handling", {"agent": "room-1", "device": CAM["key"], "note": "x"}).status_code == 404
        assert pic.post("/api/handling", {"agent": "room-1", "device": SPK["key"], "note": "x"}).status_code == 404
        assert pic.get("/api/dead-letters").status_code == 403
        # what a PIC may do, in their own unit
        assert pic.get(f"/api/incidents/{site.spk_incident}").status_code == 200
        r = pic.post(f"/api/incidents/{site.spk_incident}/comment", {"text": "kabel ditarik peserta rapat"})
        assert r.status_code == 200 and r.json()["history"][-1]["actor"] == "citra"
        r = pic.post("/api/handling", {"agent": "aula-bpsdm", "device": SPK_B["key"], "note": "jatuh"})
        assert r.status_code == 200 and r.json()["context"]["reported_by"] == "citra"
        # and what it may not
        assert pic.post(f"/api/incidents/{site.spk_incident}/override",
                        {"cause": "device_fault", "reason": "bukan kami"}).status_code == 403
        assert pic.post(f"/api/incidents/{site.spk_incident}/ack", {}).status_code == 403
        assert pic.post("/api/loans", {"device": SPK_B["key"], "note": "x"}).status_code == 403
        assert pic.get("/api/users").status_code == 403
    with Browser(site.base, "budi") as pic:  # setjen: the unregistered speakerphone in its room counts as its
        assert {r["id"] for r in pic.get("/api/incidents?unit=bpsdm").json()} == {site.cam_incident}
        assert pic.post("/api/handling", {"agent": "room-1", "device": SPK["key"], "note": "x"}).status_code == 200
        assert pic.post("/api/handling", {"agent": "aula-bpsdm", "device": SPK_B["key"],
                                          "note": "x"}).status_code == 404


def test_roles_viewer_operator_admin(site: Site) -> None:
    cam = site.cam_incident
    with Browser(site.base, "dewi") as viewer:
        assert len(viewer.get("/api/incidents").json()) == 2
        assert viewer.get("/api/dead-letters").status_code == 200
        for path, body in ((f"/api/incidents/{cam}/override", {"cause": "host_issue", "reason": "x"}),
                           (f"/api/incidents/{cam}/ack", {}), (f"/api/incidents/{cam}/comment", {"text": "x"}),
                           ("/api/handling", {"agent": "room-1", "device": CAM["key"], "note": "x"}),
                           ("/api/loans", {"device": CAM["key"], "note": "x"}), ("/api/users/ani/disable", {})):
            r = viewer.post(path, body)
            assert r.status_code == 403 and "viewer" in r.json()["error"], path
    with Browser(site.base, "ani") as op:
        r = op.post(f"/api/incidents/{cam}/override", {"cause": "handling_damage", "reason": "kabel putus"})
        assert r.status_code == 200 and r.json()["decided_by"] == "ani"
        # the body cannot name someone else any more
        r = op.post(f"/api/incidents/{cam}/ack", {"by": "budi"})
        assert r.status_code == 400 and "by" in r.json()["error"]
        r = op.post(f"/api/incidents/{cam}/ack", {})
        assert r.status_code == 200 and r.json()["acknowledged_by"] == "ani"
        assert [h["actor"] for h in op.get(f"/api/incidents/{cam}").json()["history"]][-2:] == ["ani", "ani"]
        assert op.post("/api/loans", {"device": CAM["key"], "note": "dicek"}).status_code == 200
        assert op.post("/api/users", {"name": "x", "role": "viewer"}).status_code == 403
    with Browser(site.base, "root") as admin:
        assert {u["name"] for u in admin.get("/api/users").json()} >= {"root", "ani", "budi", "citra", "dewi"}
        r = admin.post("/api/users", {"name": "eko", "role": "pic", "unit": "bpsdm", "password": PASSWORD})
        assert r.status_code == 200 and r.json()["unit"] == "bpsdm"
        assert admin.post("/api/users", {"name": "eko", "role": "viewer"}).status_code == 400
        assert admin.post("/api/users", {"name": "fajar", "role": "pic"}).status_code == 400  # no unit
        token = admin.post("/api/users/dewi/tokens", {"label": "laporan"}).json()["token"]
        bearer = {"Authorization": f"Bearer {token}"}
        assert httpx.get(site.base + "/api/incidents", headers=bearer).status_code == 200
        assert admin.post("/api/registry/reload", {}).json() == {"devices_in_file": 2}
        with Browser(site.base, "dewi") as victim:
            assert admin.post("/api/users/dewi/disable", {}).status_code == 200
            assert victim.get("/api/incidents").status_code == 401  # the session ended
        assert httpx.get(site.base + "/api/incidents", headers=bearer).status_code == 401  # the token too
        assert admin.post("/api/users/root/disable", {}).status_code == 400
    r = httpx.post(site.base + "/api/login", json={"username": "dewi", "password": PASSWORD})
    assert r.status_code == 401
    actions = [r["action"] for r in site.store.query("SELECT action FROM audit WHERE incident IS NULL")]
    assert {"user.added", "token.created", "user.disabled", "loan.updated", "registry.reloaded"} <= set(actions)


def test_tokens_need_no_csrf_but_json_and_a_live_token(site: Site) -> None:
    token = token_for(site.store, "script", "operator")
    h = {"Authorization": f"Bearer {token}"}
    r = httpx.post(site.base + "/api/loans", json={"device": "1111:2222:NEW", "unit": "setjen"}, headers=h)
    assert r.status_code == 200 and r.json()["updated_by"] == "script"
    r = httpx.post(site.base + "/api/loans", content='{"device": "x", "unit": "setjen"}',
                   headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 403
    for bad in ("Bearer nope", "Basic cm9vdDp4", "Bearer", token):
        r = httpx.get(site.base + "/api/incidents", headers={"Authorization": bad})
        assert r.status_code == 401, bad
    assert site.store.query("SELECT id FROM tokens WHERE id = ?", (token,)) == []  # only its hash is kept


def test_sign_in_cookie_rate_limit_and_log(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    with Browser(site.base, "ani") as b:
        cookie = b.login_response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    r = httpx.post(site.base + "/api/login", json={"username": "ani", "password": PASSWORD},
                   headers={"X-Forwarded-Proto": "https"})  # behind a TLS-terminating proxy on loopback
    assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()
    caplog.set_level(logging.WARNING, logger="collector.web.auth")
    for _ in range(users.MAX_FAILS_PER_USER):
        r = httpx.post(site.base + "/api/login", json={"username": "budi", "password": "salah-sekali"})
        assert r.status_code == 401
    r = httpx.post(site.base + "/api/login", json={"username": "budi", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0  # even with the right password now
    assert "failed sign-in for 'budi' from 127.0.0.1" in caplog.text and "too many failures" in caplog.text
    assert httpx.post(site.base + "/api/login", json={"username": "citra", "password": PASSWORD}).status_code == 200
    r = httpx.post(site.base + "/api/login", json={"username": "nobody", "password": PASSWORD})
    assert r.status_code == 401
    r = httpx.post(site.base + "/api/login", json={"once": "po_forged"})
    assert r.status_code == 401
    link = users.new_token(site.store, "budi", "link", "test", kind="once")
    with httpx.Client(base_url=site.base) as c:
        assert c.post("/api/login", json={"once": link}).status_code == 200
        assert c.get("/api/me").json()["user"]["name"] == "budi"
    assert httpx.post(site.base + "/api/login", json={"once": link}).status_code == 401  # used once


def test_public_paths_headers_and_generated_openapi(site: Site) -> None:
    anon = httpx.Client(base_url=site.base, timeout=10)
    for path in ("/healthz", "/login", "/login.js", "/style.css", "/metrics"):
        assert anon.get(path).status_code == 200, path
    for path in ("/api/incidents", "/api/openapi.json", "/api/agents", "/api/me", "/api/nope"):
        r = anon.get(path)
        assert r.status_code == 401 and r.json()["error"], path
    for path in ("/app.js", "/"):  # pages: to the login page
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/login"
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    page = anon.get("/login").text
    assert "<script>" not in page and " on" not in re.sub(r"\s+", " ", page).lower().replace("one", "")
    with Browser(site.base, "dewi") as b:
        doc = b.get("/api/openapi.json").json()
        assert doc["info"]["title"] == "Pantau collector"
        for p in ("/api/incidents/{id}/override", "/api/login", "/api/loans", "/healthz", "/metrics"):
            assert p in doc["paths"], p
        assert "by" not in json.dumps(doc["components"]["schemas"]["OverrideBody"]["properties"])
        # the document says what the server answers: one-line errors, 400 (never 422), how to authenticate
        assert "422" not in json.dumps(doc) and "HTTPValidationError" not in json.dumps(doc)
        assert set(doc["components"]["securitySchemes"]) == {"bearer", "session"}
        override = doc["paths"]["/api/incidents/{id}/override"]["post"]["responses"]
        assert {"400", "401", "403", "404", "413"} <= set(override)
        assert "429" in doc["paths"]["/api/login"]["post"]["responses"]
        assert doc["paths"]["/healthz"]["get"]["security"] == []
        r = b.get("/api/incidents?limit=many")
        assert r.status_code == 400 and set(r.json()) == {"error"}
        assert b.get("/api/nope").status_code == 404
        r = b.post("/api/loans", {"device": "x", "unit": "setjen", "extra": "y" * (70 * 1024)})
        assert r.status_code == 413


def test_healthz_metrics_clock_offsets_and_no_nan(site: Site) -> None:
    with site.store.tx() as db:
        db.execute("UPDATE agents SET clock = '2026-11-30T01:05:00.000Z', clock_offset_s = 300.5 "
                   "WHERE agent = 'room-1'")
        db.execute("UPDATE agents SET clock_offset_s = ? WHERE agent = 'aula-bpsdm'", (math.inf,))
    assert httpx.get(site.base + "/healthz").json() == {"ok": True}
    text = httpx.get(site.base + "/metrics").text
    assert 'pantau_agent_clock_offset_seconds{agent="room-1"} 300.5' in text
    assert 'agent="aula-bpsdm"' not in text and "pantau_healthy 1.0" in text
    assert re.search(r"^pantau_messages_received_total \d", text, re.M)
    site.reasons[:] = ["broker: disconnected for 30 s"]
    r = httpx.get(site.base + "/healthz")
    assert r.status_code == 503 and r.json() == {"ok": False, "reasons": ["broker: disconnected for 30 s"]}
    assert "pantau_healthy 0.0" in httpx.get(site.base + "/metrics").text
    with Browser(site.base, "dewi") as b:
        raw = b.get("/api/agents").text

        def refuse(c: str) -> None:
            raise AssertionError(f"{c} in JSON")

        agents = {a["agent"]: a for a in json.loads(raw, parse_constant=refuse)}
        assert agents["room-1"]["clock_suspect"] is True and agents["room-1"]["clock_offset_s"] == 300.5
        assert agents["aula-bpsdm"]["clock_offset_s"] is None and agents["aula-bpsdm"]["clock_suspect"] is False
        inc = b.get(f"/api/incidents/{site.cam_incident}").json()
        assert inc["policy"] and inc["registry"]["unit"] == "setjen"


def test_metrics_may_require_a_token(tmp_path: Path, store_db: str) -> None:
    s = Site(tmp_path, WebSettings(metrics_require_token=True), store_db)
    try:
        assert httpx.get(s.base + "/metrics").status_code == 401
        token = token_for(s.store, "prometheus")
        r = httpx.get(s.base + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "pantau_healthy" in r.text
    finally:
        s.stop()


def test_trusted_proxy_header(tmp_path: Path, store_db: str) -> None:
    s = Site(tmp_path, WebSettings(proxy_header="X-Remote-User"), store_db)
    try:
        h = {"X-Remote-User": "ani"}
        me = httpx.get(s.base + "/api/me", headers=h).json()
        assert me["user"]["name"] == "ani" and me["via"] == "proxy"
        assert httpx.get(s.base + "/api/me", headers={"X-Remote-User": "mallory"}).status_code == 401
        body = {"cause": "host_issue", "reason": "lewat SSO"}
        url = f"{s.base}/api/incidents/{s.cam_incident}/override"
        assert httpx.post(url, json=body, headers=h).status_code == 403  # no CSRF token
        assert httpx.post(url, json=body, headers={**h, "X-CSRF-Token": me["csrf"], "Origin": FOREIGN}
                          ).status_code == 403
        r = httpx.post(url, json=body, headers={**h, "X-CSRF-Token": me["csrf"], "Origin": s.base})
        assert r.status_code == 200 and r.json()["decided_by"] == "ani"
    finally:
        s.stop()
    (tmp_path / "off").mkdir()
    s = Site(tmp_path / "off")  # the header is not trusted unless configured
    try:
        assert httpx.get(s.base + "/api/me", headers={"X-Remote-User": "ani"}).status_code == 401
    finally:
        s.stop()


def test_user_commands(tmp_path: Path, store_db: str) -> None:
    env = {**os.environ, "PANTAU_DB": store_db,
           "PANTAU_AUDIT_KEY_FILE": str(tmp_path / "k" / "a.key")}
    out = run_cli("collector.cli", "user", "add", "ani", "--role", "operator", "--password-stdin", env=env,
                  input=PASSWORD + "\n")
    assert out.returncode == 0, out.stderr
    bad = run_cli("collector.cli", "user", "add", "budi", "--role", "pic", "--password-stdin", env=env,
                  input=PASSWORD + "\n")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--unit" in bad.stderr
    short = run_cli("collector.cli", "user", "add", "budi", "--role", "viewer", "--password-stdin", env=env,
                    input="pendek\n")
    assert short.returncode == 2 and "at least" in short.stderr
    for weak in (" " * 12, "\x00" * 12, "aaaaaaaaaaaa"):
        r = run_cli("collector.cli", "user", "add", "budi", "--role", "viewer", "--password-stdin", env=env,
                    input=weak + "\n")
        assert r.returncode == 2 and "password" in r.stderr, repr(weak)
    nounit = run_cli("collector.cli", "user", "add", "budi", "--role", "pic", "--unit", "nowhere", "--password-stdin",
                     env=env, input=PASSWORD + "\n")
    assert nounit.returncode == 2 and "'nowhere' is not in the registry" in nounit.stderr
    token = run_cli("collector.cli", "user", "token", "ani", env=env).stdout.strip()
    assert token.startswith("pt_")
    listing = run_cli("collector.cli", "user", "list", env=env).stdout
    assert "ani\toperator\t-\tenabled\tpassword\t1 tokens" in listing
    assert oct(os.stat(tmp_path / "k" / "a.key").st_mode & 0o777) == "0o600"
    from collector.store import open_store

    store = open_store(store_db)
    try:
        assert users.check_password(store, "ani", PASSWORD) is not None
        assert users.token_user(store, token) is not None
        assert run_cli("collector.cli", "user", "disable", "ani", env=env).returncode == 0
        assert users.check_password(store, "ani", PASSWORD) is None and users.token_user(store, token) is None
    finally:
        store.close()
    assert run_cli("collector.cli", "user", "disable", "nobody", env=env).returncode == 2
    ok = run_cli("collector.cli", "audit", "verify", env=env)
    assert ok.returncode == 0 and "chain intact" in ok.stdout
