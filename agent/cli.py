"""``pantau-agent``: run, once, signals, simulate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from agent import __version__
from agent.config import AgentConfig, ConfigError, load
from common.config import read_toml

DEFAULT_ROOM: dict[str, Any] = {
    "devices": [
        {"vid": "046d", "pid": "085e", "serial": "SIM-BRIO-0001", "kind": "camera", "vendor": "Logitech",
         "product": "Logitech BRIO", "port": "1-2", "speed": "super", "max_speed": "super", "firmware": "3.17",
         "in_use": False, "users": [], "meeting": False},
        {"vid": "0b0e", "pid": "2456", "serial": "SIM-SPK-0001", "kind": "speakerphone", "vendor": "Jabra",
         "product": "Jabra SPEAK 810", "port": "1-3", "speed": "full", "max_speed": "full", "firmware": "1.08",
         "in_use": False, "users": [], "meeting": False},
    ]
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pantau-agent", description="Watch lent USB video-conference devices and "
                                "report their health, events and errors over MQTT.")
    p.add_argument("--version", action="version", version=f"pantau-agent {__version__}")
    p.add_argument("--config", help="TOML configuration file (default: $PANTAU_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("run", help="observe and report until stopped (SIGTERM/Ctrl-C stops cleanly)")
    sub.add_parser("once", help="print the current snapshot (devices, usage, host) as JSON")
    s = sub.add_parser("signals", help="print what the agent makes of a kernel log, one JSON object a line")
    s.add_argument("--kernel-log", required=True, metavar="FILE", help="kernel log (dmesg, journal or /dev/kmsg)")
    h = sub.add_parser("report-handling", help="record that a person handled a device (dropped it, pulled the "
                       "cable); the running agent sends it as its next event, or the next one to start")
    h.add_argument("device", help="device key as in `pantau-agent once` (vid:pid:serial or vid:pid@port); "
                   "a device not plugged in now is fine")
    h.add_argument("--note", required=True, help="what happened, in a sentence (at most 500 characters)")
    h.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for a running agent to take the report (default: 5 polls, at least 10 s)")
    e = sub.add_parser("enroll", help="fetch this PC's configuration and broker account from the collector with a "
                       "one-time token (over HTTPS, pinned to the certificate fingerprint shown with the token)")
    e.add_argument("collector", help="the collector's address, e.g. https://pantau.example.go.id:8443")
    e.add_argument("token", help="the enrollment token (pe_...)")
    e.add_argument("--fingerprint", required=True, help="the collector certificate's SHA-256 (AB:CD:...)")
    e.add_argument("--state-dir", default="/var/lib/pantau-agent")
    e.add_argument("--install", action="store_true", help="also install, enable and start the systemd service")
    e.add_argument("--force", action="store_true", help="replace an existing configuration")
    sim = sub.add_parser("simulate", help="run against a simulated room (a JSON bus file, created if missing)")
    sim.add_argument("--bus", default=None, help="bus file (default: $PANTAU_SIMULATED_BUS or ./var/sim/room.json)")
    return p


def _run(cfg: AgentConfig) -> int:
    from agent.runner import Agent
    from agent.state import AlreadyRunning

    try:
        agent = Agent(cfg)
    except OSError as exc:
        print(f"pantau-agent: cannot use state directory {cfg.state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except AlreadyRunning as exc:
        print(f"pantau-agent: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        agent.stop_event.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


def _report_handling(cfg: AgentConfig, key: str, note: str, wait_s: float | None) -> int:
    """Hand a handling report to the agent (see agent/handoff.py): it goes out as the running agent's
    next event, in order with everything else it saw; with no agent running, after the next start."""
    import time

    from agent.handoff import ReportError, write_report
    from agent.state import agent_running

    try:
        path = write_report(cfg.state_dir, key, note)
    except ReportError as exc:
        print(f"pantau-agent report-handling: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pantau-agent report-handling: cannot queue the report in {cfg.state_dir}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    running = agent_running(cfg.state_dir)
    if not running:
        print(f"handling of {key.strip()} queued; "
              + ("no agent runs now: it goes out after the next start" if running is False
                 else "the agent sends it when it next looks"))
        return 0
    end = time.monotonic() + (wait_s if wait_s is not None else max(10.0, 5 * cfg.poll_s))
    while os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.05)
    if os.path.exists(path):
        print(f"handling of {key.strip()} queued; the running agent has not taken it yet (it will)")
    else:
        print(f"handling of {key.strip()} handed to the running agent")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from agent.enroll import EnrollFailed, enroll

    path = args.config or os.environ.get("PANTAU_CONFIG") or "/etc/pantau/agent.toml"
    try:
        answer, started = enroll(args.collector, args.token, args.fingerprint, path, args.state_dir, args.install,
                                 args.force)
    except EnrollFailed as exc:
        print(f"pantau-agent enroll: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pantau-agent enroll: cannot write {exc.filename or path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    labels = answer.get("labels") or {}
    print(f"enrolled as {answer['agent_id']} (unit {labels.get('unit', '-')}, room {labels.get('room', '-')}); "
          f"configuration in {path}")
    if started:
        print("service pantau-agent enabled and started (systemctl status pantau-agent)")
    elif args.install:
        print(f"no systemd here: start the agent with `pantau-agent --config {path} run`")
    return 0


def _signals(path: str) -> int:
    from agent.signals.kmsg import parse_lines

    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for sig in parse_lines(fh):
                sys.stdout.write(json.dumps(sig.as_json()) + "\n")
    except OSError as exc:
        print(f"pantau-agent signals: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.cmd is None:
        _parser().print_help()
        return 2
    if args.cmd == "signals":
        return _signals(args.kernel_log)
    if args.cmd == "enroll":
        return _enroll(args)
    overrides: dict[str, Any] = {}
    try:
        if args.cmd == "simulate":  # the config's own bus and state folder, else ones beside the working folder
            path = args.config or os.environ.get("PANTAU_CONFIG")
            given = read_toml(path) if path else {}
            bus = (args.bus or os.environ.get("PANTAU_SIMULATED_BUS") or given.get("simulated_bus")
                   or os.path.join("var", "sim", "room.json"))
            if not isinstance(bus, str):
                raise ConfigError(f"config: simulated_bus: {bus!r} must be a string")
            if not os.path.exists(bus):
                os.makedirs(os.path.dirname(os.path.abspath(bus)), exist_ok=True)
                with open(bus, "w", encoding="utf-8") as fh:
                    json.dump(DEFAULT_ROOM, fh, indent=2)
            overrides = {"usb_backend": "simulated", "simulated_bus": bus}
            if not os.environ.get("PANTAU_STATE_DIR") and "state_dir" not in given:
                overrides["state_dir"] = os.path.join("var", "agent")
        cfg = load(args.config, **overrides)
    except ConfigError as exc:
        print(f"pantau-agent: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "report-handling":
        return _report_handling(cfg, args.device, args.note, args.wait)
    if args.cmd == "once":
        from agent.runner import snapshot

        print(json.dumps(snapshot(cfg), indent=2))
        return 0
    return _run(cfg)


if __name__ == "__main__":
    sys.exit(main())
