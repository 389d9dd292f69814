"""``pantau-collector``: serve, replay, demo, audit verify."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
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
    from collector.service import Service

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
    overrides: dict[str, Any] = {"broker": f"mqtt://127.0.0.1:{port}", "mqtt_version": "3.1.1"}
    if http:
        overrides["http"] = http
    from collector.config import load

    cfg = load(None, **{**overrides, "db": os.environ.get("PANTAU_DB", "var/pantau.sqlite"),
                        "registry": os.environ.get("PANTAU_REGISTRY") or _demo_registry()})
    from collector.service import Service

    svc = Service(cfg)
    svc.start()
    env = {**os.environ, "PANTAU_BROKER": f"mqtt://127.0.0.1:{port}", "PANTAU_AGENT_ID": "demo-ruang-rapat-1",
           "PANTAU_STATE_DIR": os.path.join("var", "agent"), "PANTAU_TELEMETRY_S": "10",
           "PANTAU_MQTT_VERSION": "3.1.1",
           "PANTAU_LABELS": "unit=setjen,room=ruang-rapat-1"}
    bus = os.path.abspath(os.path.join("var", "sim", "room.json"))
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "--bus", bus], env=env)
    print(f"\nPantau demo is running.\n  Dashboard: {svc.web.address}\n  Simulated room: edit {bus}\n"
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
    import sqlite3

    from collector import audit

    if not os.path.exists(cfg.db):
        print(f"pantau-collector audit: no database at {cfg.db}", file=sys.stderr)
        return 2
    db = sqlite3.connect(cfg.db)
    n, broken, why = audit.verify(db)
    print(f"{n} entries checked: {why}")
    return 0 if broken is None else 1


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
    if args.cmd == "audit":
        return _audit_verify(cfg)
    if args.cmd == "demo":
        return _demo(cfg, args.http)
    return _serve(cfg, args.config)


if __name__ == "__main__":
    sys.exit(main())
