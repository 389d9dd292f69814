"""``pantau-collector``: serve, replay, demo, audit verify, user (accounts), enroll, agent, bundle."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from typing import Any

from common import __version__
from common.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pantau-collector", description="Collect agents' reports, keep the lending "
                                "registry, open and classify incidents, and serve the dashboard.")
    p.add_argument("--version", action="version", version=f"pantau-collector {__version__}")
    p.add_argument("--config", help="TOML configuration (default: $PANTAU_COLLECTOR_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("serve", help="subscribe to the broker, store, classify and serve the dashboard")
    r = sub.add_parser("replay", help="re-derive incidents from a capture; one JSON object a line")
    r.add_argument("capture")
    r.add_argument("--lang", choices=("id", "en"), default="id", help="language of the summaries")
    d = sub.add_parser("demo", help="embedded broker + collector + one simulated room; Ctrl-C stops all")
    d.add_argument("--http", default=None, help="dashboard address (default 127.0.0.1:8080)")
    a = sub.add_parser("audit", help="the incident audit chain")
    a.add_argument("action", choices=("verify",))
    u = sub.add_parser("user", help="accounts: add, list, disable, password, token, link")
    us = u.add_subparsers(dest="user_cmd", metavar="ACTION", required=True)
    ua = us.add_parser("add", help="add an account")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=("admin", "operator", "pic", "viewer"))
    ua.add_argument("--unit", help="the unit a pic belongs to")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    us.add_parser("list", help="list accounts")
    ud = us.add_parser("disable", help="disable an account: its sessions end, its tokens stop working")
    ud.add_argument("name")
    up = us.add_parser("password", help="set an account's password (from stdin)")
    up.add_argument("name")
    up.add_argument("--password-stdin", action="store_true", required=True)
    ut = us.add_parser("token", help="create an API token for scripts (Authorization: Bearer ...); printed once")
    ut.add_argument("name")
    ut.add_argument("--label", default="script")
    ul = us.add_parser("link", help="print a one-time sign-in link (valid 24 h)")
    ul.add_argument("name")
    en = sub.add_parser("enroll", help="a single-use token that lets one room PC enroll itself (shown once)")
    en.add_argument("--unit", required=True)
    en.add_argument("--room", required=True)
    en.add_argument("--expires", default=None, help="how long it stays valid: 24h (default: enroll_expires_h), "
                    "90m, 2d")
    en.add_argument("--agent-id", default=None, help="default: the room's registered PC, else <unit>-<room>")
    ag = sub.add_parser("agent", help="room PCs' broker accounts: list, disable")
    ags = ag.add_subparsers(dest="agent_cmd", metavar="ACTION", required=True)
    ags.add_parser("list", help="enrolled room PCs")
    agd = ags.add_parser("disable", help="disable an agent's broker account now (the broker drops its connection)")
    agd.add_argument("agent_id")
    agd.add_argument("--reason", default="", help="e.g. lease ended, PC replaced")
    bu = sub.add_parser("bundle", help="build the agent's installer bundle (wheels of the agent and its "
                        "dependencies) that the collector serves to room PCs")
    bu.add_argument("--out", default=None, help="default: bundle_dir")
    bu.add_argument("--source", default=None, help="a Pantau checkout (default: this one)")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def _serve(cfg: Any, config_path: str | None = None) -> int:
    from collector import audit
    from collector.service import Service
    from collector.store import open_store

    open_store(cfg.db).close()  # a damaged database stops here, before anything is created beside it
    audit.configure(cfg.db, cfg.audit_key_file)
    svc = Service(cfg)
    svc.config_path = config_path
    svc.start()
    print(f"pantau-collector: dashboard and API on {svc.web.address}", flush=True)
    _wait_for_signal()
    svc.stop()
    return 0


def _demo(cfg: Any, http: str | None) -> int:
    from collector.broker import EmbeddedBroker

    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    port = _free_port()
    broker = EmbeddedBroker(port)
    broker.start()
    # the embedded broker has no shared subscriptions: the demo receives in the collector's own process
    overrides: dict[str, Any] = {"broker": f"mqtt://127.0.0.1:{port}", "mqtt_version": "3.1.1", "receivers": 0}
    if http:
        overrides["http"] = http
    from collector.config import load

    cfg = load(None, **{**overrides, "db": os.environ.get("PANTAU_DB", "var/pantau.sqlite"),
                        "registry": os.environ.get("PANTAU_REGISTRY") or _demo_registry()})
    from collector import audit, users
    from collector.service import Service

    audit.configure(cfg.db, cfg.audit_key_file)
    svc = Service(cfg)
    svc.start()
    store = svc.collector.store
    admin = users.any_admin(store)
    if admin is None:
        admin = users.add(store, "admin", "admin", None, None, "demo").name
    link = f"{svc.web.address}login#once={users.new_token(store, admin, 'demo sign-in link', 'demo', kind='once')}"
    env = {**os.environ, "PANTAU_BROKER": f"mqtt://127.0.0.1:{port}", "PANTAU_AGENT_ID": "demo-ruang-rapat-1",
           "PANTAU_STATE_DIR": os.path.join("var", "agent"), "PANTAU_TELEMETRY_S": "10",
           "PANTAU_MQTT_VERSION": "3.1.1",
           "PANTAU_LABELS": "unit=setjen,room=ruang-rapat-1"}
    bus = os.path.abspath(os.path.join("var", "sim", "room.json"))
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "--bus", bus], env=env)
    print(f"\nPantau demo is running.\n  Dashboard: {svc.web.address}\n"
          f"  Sign in:   {link}\n"
          f"             (a one-time link for the account {admin!r}, valid 24 h; each start prints a new one.\n"
          f"             To sign in with a password instead: .venv/bin/pantau-collector user password {admin} "
          "--password-stdin)\n"
          f"  Simulated room: edit {bus}\n"
          "  (remove a device to unplug it, change its port to move it, add \"errors\" to break it)\n"
          "  Ctrl-C stops everything.\n", flush=True)
    try:
        _wait_for_signal()
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        svc.stop()
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        broker.stop()
    return 0


def _demo_registry() -> str:
    path = os.path.join("var", "registry.toml")
    if not os.path.exists(path):
        os.makedirs("var", exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(DEMO_REGISTRY)
    return path


DEMO_REGISTRY = """# Demo lending registry (format: docs/registry.md)
[[units]]
id = "setjen"
name = "Sekretariat Jenderal"
pic = { name = "Budi Santoso", email = "budi@example.go.id", phone = "+62 812 0000 0001" }
rooms = [{ id = "ruang-rapat-1", name = "Ruang Rapat 1", agent = "demo-ruang-rapat-1" }]
[[units.devices]]
key = "046d:085e:SIM-BRIO-0001"
room = "ruang-rapat-1"
lease_start = "2026-01-05"
lease_end = "2027-01-04"
condition = "baru"

[[units.devices]]
key = "0b0e:2456:SIM-SPK-0001"
room = "ruang-rapat-1"
lease_start = "2026-01-05"
lease_end = "2027-01-04"
condition = "baru"
"""


def _audit_verify(cfg: Any) -> int:
    """Checks from a read-only connection of its own (one snapshot): a running collector is not held up."""
    import sqlite3

    from collector import audit
    from collector.store import is_postgres

    if not is_postgres(cfg.db) and not os.path.exists(cfg.db):
        print(f"pantau-collector audit: no database at {cfg.db}", file=sys.stderr)
        return 2
    audit.yield_cpu()
    try:
        n, broken, why = audit.verify_file(cfg.db, cfg.audit_key_file or audit.default_key_file(cfg.db))
    except Exception as exc:  # the key file, SQLite or the PostgreSQL server
        if not isinstance(exc, audit.AuditKeyError | sqlite3.Error) and type(exc).__module__.split(".")[0] != "psycopg":
            raise
        print(f"pantau-collector audit: {exc}", file=sys.stderr)
        return 2
    print(f"{n} entries checked: {why}")
    return 0 if broken is None else 1


def _read_password() -> str:
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _user(cfg: Any, args: argparse.Namespace) -> int:
    """Account commands, on the same database and audit key as ``serve`` (safe while it runs)."""
    import getpass

    from collector import audit, users
    from collector.store import open_store

    by = f"cli:{getpass.getuser()}"
    audit.configure(cfg.db, cfg.audit_key_file)
    store = open_store(cfg.db)
    try:
        if args.user_cmd == "add":
            password = _read_password() if args.password_stdin else None
            u = users.add(store, args.name, args.role, args.unit, password, by)
            print(f"added {u.name} ({u.role}{', ' + u.unit if u.unit else ''})"
                  + ("" if password else ": no password; use `user password`, `user link` or `user token`"))
        elif args.user_cmd == "list":
            for r in users.listing(store):
                state = "disabled" if r["disabled"] else "enabled"
                print(f"{r['name']}\t{r['role']}\t{r['unit'] or '-'}\t{state}\t"
                      f"{'password' if r['has_password'] else 'no password'}\t{r['tokens']} tokens")
        elif args.user_cmd == "disable":
            users.disable(store, args.name, by)
            print(f"disabled {args.name}")
        elif args.user_cmd == "password":
            users.set_password(store, args.name, _read_password(), by)
            print(f"password set for {args.name}")
        elif args.user_cmd == "token":
            print(users.new_token(store, args.name, args.label, by))
        elif args.user_cmd == "link":
            base = cfg.dashboard_url or f"http://{cfg.http}/"
            print(f"{base.rstrip('/')}/login#once={users.new_token(store, args.name, 'sign-in link', by, 'once')}")
    except users.UserError as exc:
        print(f"pantau-collector user: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def _enroll_cmd(cfg: Any, args: argparse.Namespace) -> int:
    """``enroll``, ``agent`` and ``bundle`` (collector/enroll.py, collector/bundle.py)."""
    import getpass

    from collector import audit, bundle, enroll
    from collector.store import open_store

    if args.cmd == "bundle":
        out = args.out or cfg.bundle_dir
        try:
            names = bundle.build(out, args.source)
        except bundle.BundleError as exc:
            print(f"pantau-collector {exc}", file=sys.stderr)
            return 2
        print(f"{len(names)} wheels in {out}: {', '.join(names)}")
        return 0
    by = f"cli:{getpass.getuser()}"
    settings = enroll.EnrollSettings.from_config(cfg)
    audit.configure(cfg.db, cfg.audit_key_file)
    store = open_store(cfg.db)
    try:
        if args.cmd == "enroll":
            expires = enroll.parse_duration(args.expires) if args.expires else settings.expires_s
            t = enroll.new_token(store, args.unit, args.room, expires, by, args.agent_id)
            fp = settings.fingerprint()
            from collector.web.enroll import commands

            print(f"token:       {t['token']}\nagent id:    {t['agent_id']} (unit {t['unit']}, room {t['room']})\n"
                  f"expires:     {t['expires_at']} (single use)\n"
                  f"fingerprint: {fp or '(the collector serves no HTTPS: set tls_cert_file or public_url)'}")
            for platform, line in commands(settings.public_url, fp, t["token"]).items():
                print(f"{platform + ':':12} {line}")
        elif args.agent_cmd == "list":
            for r in enroll.accounts(store):
                state = (f"disabled {r['disabled_at']} ({r['disabled_reason'] or '-'})" if r["disabled_at"]
                         else "enabled")
                print(f"{r['agent']}\t{r['unit']}\t{r['room']}\tenrolled {r['enrolled_at']}\t{state}")
        else:
            out = enroll.disable_agent(store, settings, args.agent_id, by, args.reason)
            print(f"disabled {out['agent']}" + ("" if out["broker_account"] else " (the broker had no account for it)"))
    except enroll.EnrollError as exc:
        print(f"pantau-collector {args.cmd}: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.cmd is None:
        _parser().print_help()
        return 2
    if args.cmd == "replay":
        from collector.replay import run

        return run(args.capture, args.lang)
    from collector.config import load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"pantau-collector: {exc}", file=sys.stderr)
        return 2
    from collector.store.sqlite import StoreError

    try:
        if args.cmd == "audit":
            return _audit_verify(cfg)
        if args.cmd == "user":
            return _user(cfg, args)
        if args.cmd in ("enroll", "agent", "bundle"):
            return _enroll_cmd(cfg, args)
        if args.cmd == "demo":
            return _demo(cfg, args.http)
        return _serve(cfg, args.config)
    except StoreError as exc:  # a damaged, foreign or unreadable database: one line, no traceback
        print(f"pantau-collector: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:  # the same, met before the store itself opened it
        print(f"pantau-collector: store: cannot open {cfg.db}: {exc} (not a Pantau database, damaged or "
              "unreadable; restore it from a backup or move it away)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
