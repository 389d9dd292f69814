"""One store interface, the same answers: one scenario is built on a SQLite file and on a PostgreSQL database,
then every read the dashboard, the API and the reports make is asked of both, and the answers must be equal
(sorting with missing values and ties, searching in any case, sums and means, booleans, JSON labels, paging).
What only a server store has (its schema version, its dialect) is tested here too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from collector import leases, queries, registry, users
from collector.ingest import Collector, Inbound
from collector.registry import load_toml
from collector.store.postgres import translate
from collector.web.server import WebServer
from common.protocol import ts_seconds
from tests.builder import CAM, SPK, T0, Agent, device
from tests.web_helpers import REGISTRY, SPK_B, add_user, open_test_store

MORE = REGISTRY + """
[[units]]
id = "biro"
name = "biro umum"
rooms = [{ id = "gudang", name = "Gudang" }]

[[units.devices]]
key = "1111:2222:NOROOM"

[[units.devices]]
key = "SERIALONLY"
room = "gudang"
lease_start = "2026-11-10"
"""
LAB = device("046d:0825:SERIALONLY", "camera", "1-5")
# what differs between two runs by the wall clock, not by the store
VOLATILE = {"updated_at", "created_at", "at", "heard_at", "offline_working_s", "taken_at", "token", "csrf",
            "server_time"}
NOW = "2026-11-30T03:00:00.000Z"


def _feed(c: Collector, lines: list[str]) -> None:
    """Each message received 1.5 s after its own ts (a fixed clock offset), whatever the wall clock."""
    for line in lines:
        rec = json.loads(line)
        ts = rec["payload"].get("ts")
        rx = ts_seconds(ts) + 1.5 if ts else T0.timestamp() + 3600
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), rx)])
    lines.clear()
    c.tick()


def _scenario(db: str, tmp: Path) -> Collector:
    tmp.mkdir(parents=True, exist_ok=True)
    store = open_test_store(db, tmp)
    (tmp / "r.toml").write_text(MORE)
    load_toml(store, str(tmp / "r.toml"))
    c = Collector(store)
    lines: list[str] = []
    a = Agent("room-1", "bootaaaa0001", lines).started()
    b = Agent("aula-bpsdm", "bootbbbb0001", lines).started(devices=[SPK_B])
    lab = Agent("ruang-lab", "bootcccc0001", lines).started(devices=[LAB])
    a.error(30, CAM, "video.stream_error")
    a.error(30.2, SPK, "usb.over_current")  # two devices of one PC within 60 s: host-wide
    b.detach(30, SPK_B, in_use=True)
    lab.error(32, LAB, "video.control_error")
    lab.event("device.recovered", 40, LAB, error={"code": "video.control_error"})
    b.telemetry(45, [])
    a.telemetry(45, [CAM["key"], SPK["key"]])
    _feed(c, lines)
    c.ingest([Inbound("pantau/v1/agents/room-1/events", b"not json", T0.timestamp() + 3600)])
    with store.tx() as db_:
        db_.execute("UPDATE agents SET labels = 'not json' WHERE agent = 'ruang-lab'")
        for i in range(12):  # ties in opened_at, missing resolved_at and decisions, mixed-case text
            db_.execute("INSERT INTO incidents (id, agent, device, kind, status, cause, responsible, confidence, "
                        "rule, opened_at, resolved_at, evidence, summary, decided_cause, updated_at) VALUES "
                        "(?, 'room-1', ?, ?, ?, ?, 'undetermined', 0.5, 'D3', ?, ?, '[]', ?, ?, ?)",
                        (f"x{i:03d}", SPK["key"] if i % 2 else CAM["key"], "device_error" if i % 3 else
                         "device_missing", "open" if i % 4 == 0 else "resolved", "needs_inspection",
                         f"2026-11-30T02:{i // 3:02d}:00.000Z", None if i % 4 == 0 else "2026-11-30T02:30:00.000Z",
                         "Kabel SPEAKER" if i % 2 else "kamera mati", "device_fault" if i % 5 == 0 else None, NOW))
        t0 = 1_780_000_200.0
        db_.executemany("INSERT INTO device_samples (ts, agent, device, present, in_use, errors_total, resets_total, "
                        "speed_rank, rx) VALUES (?, 'room-1', ?, ?, ?, ?, 0, ?, ?)",
                        [(t0 + k * 100, CAM["key"], k % 3 > 0, k % 2, float(k // 2), k % 5, t0 + k * 100)
                         for k in range(40)])
        db_.executemany("INSERT INTO host_samples (ts, agent, cpu_pct, mem_pct, rx) VALUES (?, 'room-1', ?, ?, ?)",
                        [(t0 + k * 100, 10.0 + k, None if k % 7 == 0 else 50.0, t0 + k * 100) for k in range(40)])
    store.roll_up_and_expire(t0 + 86400)
    ids = {r["device"]: r["id"] for r in store.query("SELECT id, device FROM incidents WHERE id NOT LIKE 'x%'")}
    c.book.override(ids[CAM["key"]], "handling_damage", "kabel tertarik", "ani", NOW)
    c.book.acknowledge(ids[SPK_B["key"]], "ani", NOW)
    registry.update_loan(store, CAM["key"], {"note": "Lensa Tergores"}, "ani", NOW)
    leases.record_return(store, SPK_B["key"], "ani", "2026-11-30T02:00:00Z")
    for name, role, unit in (("root", "admin", None), ("ani", "operator", None), ("citra", "pic", "bpsdm"),
                             ("Dewi", "viewer", None)):
        add_user(store, name, role, unit)
    users.new_token(store, "ani", "skrip", "root")
    return c


def language_database(server: Any, name: str) -> str:
    """A database whose default collation is a language's (ICU en-US: 'B' after 'a', punctuation ignored), as
    an operator's CREATE DATABASE may well make it; the store must compare text by bytes all the same."""
    import psycopg

    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} LOCALE_PROVIDER icu ICU_LOCALE 'en-US' TEMPLATE template0")
    return str(server.dsn(name))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, postgres_server: Any) -> Iterator[dict[str, Any]]:
    """The scenario on each store, each behind its own web server, and an admin's token for each."""
    tmp = tmp_path_factory.mktemp("both")
    out: dict[str, Any] = {}
    pg = language_database(postgres_server, "both_en_us")
    for name, db in (("sqlite", str(tmp / "s" / "c.sqlite")), ("postgresql", pg)):
        c = _scenario(db, tmp / name)
        web = WebServer(c, "127.0.0.1", 0)
        web.start()
        out[name] = {"collector": c, "store": c.store, "web": web, "url": web.address.rstrip("/"),
                     "token": users.new_token(c.store, "root", "uji", "root")}
    yield out
    for s in out.values():
        s["web"].stop()
        s["store"].close()


def _stable(v: Any) -> Any:
    """``v`` without what the wall clock decides, its numbers with their type (3 is not 3.0 here)."""
    if isinstance(v, dict):
        return {k: _stable(x) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [_stable(x) for x in v]
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (type(v).__name__, v)
    return v


def _same(both: dict[str, Any], path: str) -> Any:
    """GET ``path`` from both stores' servers as an admin: the same answer (its body as JSON, or text)."""
    got, body = {}, None
    for name, s in both.items():
        r = httpx.get(s["url"] + path, headers={"Authorization": f"Bearer {s['token']}"}, timeout=30)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        got[name] = (r.status_code, r.headers.get("x-total-count"), _stable(body))
    assert got["sqlite"] == got["postgresql"], path
    assert got["sqlite"][0] in (200, 400, 404), path
    return body


def test_incident_lists_sorted_searched_filtered_and_paged_alike(both: dict[str, Any]) -> None:
    for sort in queries.SORTS:
        for order in ("asc", "desc"):
            page = _same(both, f"/api/incidents?status=all&sort={sort}&order={order}&limit=100")
            assert len(page) == 16, sort  # 4 from the agents' events, 12 written directly
    paged = [i["id"] for off in range(0, 16, 5)
             for i in _same(both, f"/api/incidents?status=all&sort=room&order=asc&limit=5&offset={off}")]
    assert len(paged) == len(set(paged)) == 16  # ties and missing values: never twice, never skipped
    for q in ("SPEAKER", "speaker", "Sidang", "SIDANG", "biro", "bpsdm", "cam1", "%", "_", "x00"):
        _same(both, f"/api/incidents?status=all&q={quote(q)}")
    # in any case: six summaries "Kabel SPEAKER", two "Speakerphone ..."
    assert len(_same(both, "/api/incidents?status=all&q=speaker")) == 8
    for f in ("status=open", "status=resolved", "status=withdrawn", "unit=setjen", "unit=biro", "unit=bpsdm",
              "cause=device_fault", "cause=handling_damage", "responsible=unit", "kind=device_missing",
              "model=046D:085E", "agent=ruang-lab", "since=2026-11-30T02:01:00Z&until=2026-11-30T02:03:00Z",
              "since=2026-11-30", "limit=0", "sort=nope"):
        _same(both, f"/api/incidents?status=all&{f}")
    assert _same(both, "/api/incidents?unit=biro&status=all")[0]["device"] == LAB["key"]  # by its loan's serial


def test_each_incident_and_device_page_alike(both: dict[str, Any]) -> None:
    ids = [r["id"] for r in both["sqlite"]["store"].query("SELECT id FROM incidents ORDER BY id")]
    for iid in ids:
        one = _same(both, f"/api/incidents/{iid}")
        assert one["id"] == iid
    for key, agent in ((CAM["key"], "room-1"), (SPK["key"], None), (SPK_B["key"], "aula-bpsdm"),
                       (LAB["key"], "ruang-lab"), ("dead:beef:NONE", None)):
        suffix = f"?agent={agent}&" if agent else "?"
        _same(both, f"/api/devices/{quote(key, safe='')}{suffix}")
        _same(both, f"/api/devices/{quote(key, safe='')}/history{suffix}from=2026-11-29&to=2026-12-01")


def test_history_from_the_rollups_alike(both: dict[str, Any]) -> None:
    frm, to = "2026-05-28T20:30:00Z", "2026-05-29T20:30:00Z"
    for step in ("raw", "5m", "1h", "1d", "auto"):
        h = _same(both, f"/api/devices/{quote(CAM['key'], safe='')}/history?agent=room-1&from={frm}&to={to}"
                        f"&step={step}")
        assert h["series"]["present"], step
        a = _same(both, f"/api/agents/room-1/history?from={frm}&to={to}&step={step}")
        assert a["series"]["cpu_pct"], step
    five = _same(both, f"/api/agents/room-1/history?from={frm}&to={to}&step=5m")["series"]
    assert five["cpu_pct"][0] == [1780000200, 11.0, 10.0, 12.0, 3]  # a mean of integers is not cut to one
    assert isinstance(five["cpu_pct"][0][0], int)


def test_fleet_overview_registry_reports_and_accounts_alike(both: dict[str, Any]) -> None:
    for path in ("/api/overview", "/api/overview?unit=setjen", "/api/overview?unit=biro", "/api/meta",
                 "/api/agents", "/api/units", "/api/rooms", "/api/loans", "/api/users", "/api/dead-letters",
                 "/api/leases/flags", "/api/enroll/accounts", "/api/audit/verify", "/api/me",
                 f"/api/loans/{quote(CAM['key'], safe='')}", f"/api/loans/{quote(SPK_B['key'], safe='')}/snapshots",
                 "/api/fleet/room-1", "/api/fleet/ruang-lab", "/api/fleet/nope",
                 "/api/reports/unit?unit=setjen&month=2026-11", "/api/reports/unit?unit=biro&month=2026-11",
                 "/api/reports/unit?unit=setjen&month=2026-11&format=csv",
                 "/api/reports/unit?unit=bpsdm&from=2026-11-01&to=2026-11-30",
                 "/api/reports/failure-rates?month=2026-11", "/api/reports/failure-rates?month=2026-11&format=csv"):
        _same(both, path)
    for sort in ("room", "unit", "state", "last_seen", "problems", "devices"):
        for order in ("asc", "desc"):
            _same(both, f"/api/fleet?sort={sort}&order={order}")
    for f in ("status=missing", "status=error", "status=offline", "q=LAB", "kind=camera", "model=046d:0825"):
        _same(both, f"/api/fleet?{f}")
    s, p = both["sqlite"]["store"], both["postgresql"]["store"]
    assert users.any_admin(s) == users.any_admin(p) == "root"
    assert _stable(users.listing(s)) == _stable(users.listing(p))
    assert queries.unit_of_agent(s, "ruang-lab") is queries.unit_of_agent(p, "ruang-lab") is None  # labels: not JSON
    assert queries.unit_of_agent(s, "room-1") == queries.unit_of_agent(p, "room-1") == "setjen"


def test_sessions_tokens_and_sign_in_limits_alike(both: dict[str, Any]) -> None:
    for s in both.values():
        store = s["store"]
        u = users.check_password(store, "ani", "kata-sandi-uji-1")
        assert u is not None and u.role == "operator"
        token, csrf = users.new_session(store, u, 60)
        assert users.session(store, token) == (u, csrf)
        users.end_session(store, token)
        assert users.session(store, token) is None
        once = users.new_token(store, "citra", "tautan", "root", kind="once")
        assert users.use_once(store, once) == users.User("citra", "pic", "bpsdm")
        assert users.use_once(store, once) is None
        rows = [users.record_failure(store, "Dewi", "10.1.1.1", 1000.0 + i) for i in range(users.MAX_FAILS_PER_USER)]
        assert all(isinstance(r, int) and r > 0 for r in rows)
        assert users.failures_wait(store, "Dewi", "10.1.1.2", 1100.0) == pytest.approx(users.FAIL_WINDOW_S - 100)
        users.forget_failure(store, rows[0])
        assert users.failures_wait(store, "Dewi", "10.1.1.2", 1100.0) == 0.0
        assert users.failures_wait(store, "dewi", "10.1.1.2", 1100.0) == 0.0  # names are matched exactly


def test_translate_speaks_the_collectors_sqlite_for_postgresql() -> None:
    assert translate("INSERT OR IGNORE INTO seen VALUES (?, ?)") == (
        "INSERT INTO seen VALUES (%s, %s) ON CONFLICT DO NOTHING", False)
    assert translate("INSERT INTO evidence (a) VALUES (?)") == ("INSERT INTO evidence (a) VALUES (%s) RETURNING id",
                                                                True)
    assert translate("SELECT * FROM t WHERE a LIKE '%?%' AND b = ?")[0] == \
        "SELECT * FROM t WHERE a LIKE '%%?%%' AND b = %s"  # a ? or % inside a string is text
    assert translate("DELETE FROM login_failures WHERE rowid = ?")[0] == "DELETE FROM login_failures WHERE id = %s"
    assert translate("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b REAL)")[0] == (
        'CREATE TABLE IF NOT EXISTS t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, '
        'a TEXT COLLATE "C" NOT NULL, b DOUBLE PRECISION)')
    assert translate("SELECT CAST(x AS TEXT) FROM t")[0] == "SELECT CAST(x AS TEXT) FROM t"  # only in a table's DDL


def test_text_compares_by_bytes_and_a_newer_database_is_refused(postgres_server: Any, tmp_path: Path) -> None:
    from collector.notify import Notifier, NotifyConfig
    from collector.store import StoreError
    from collector.store.postgres import MIGRATIONS, PostgresStore

    db = language_database(postgres_server, "bytes_en_us")
    store = open_test_store(db, tmp_path)
    assert store.schema_version() == len(MIGRATIONS)
    n = Notifier(store, NotifyConfig(webhook_url="http://127.0.0.1:9/hook"))  # its table is made at run time
    assert store.query("SELECT table_name, column_name FROM information_schema.columns WHERE data_type = 'text' "
                       "AND table_schema = current_schema() AND collation_name IS DISTINCT FROM 'C'") == []
    n.add_source("fleet", lambda *a: None)
    n.record("fleet", "offline_long:room-1", "open", "offline_long")
    assert n.announced("fleet") == {"offline_long:room-1": ("open", "offline_long")}  # 'fleet:' <= key < 'fleet;'
    with store.tx() as con:
        con.executemany("INSERT INTO units (id, name) VALUES (?, ?)", [("u1", "a"), ("u2", "B"), ("u3", "É")])
    assert [r["name"] for r in store.query("SELECT name FROM units ORDER BY name")] == ["B", "a", "É"]  # as SQLite
    assert store.query("SELECT lower(name) AS n FROM units WHERE id = 'u3'") == [{"n": "É"}]  # ASCII only, too
    store.db.execute("UPDATE pantau_schema SET version = ?", (len(MIGRATIONS) + 1,))
    store.close()
    with pytest.raises(StoreError, match="newer than this collector"):
        PostgresStore(db)
