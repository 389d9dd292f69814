"""Ingest benchmark: the collector's rate to committed storage against mosquitto_sub's, same run.

Publishes N mixed telemetry and event messages from many agents through Mosquitto with
parallel `mosquitto_pub -l` processes (one per agent and channel), while `mosquitto_sub`
and the collector both receive the stream. Prints each side's rate, the ratio (target >= 0.5)
and the collector's RSS as the stream grows (target: flat).

    python bench/ingest.py [--messages 200000] [--agents 40] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from common import ROOT, Broker, free_port  # type: ignore[import-not-found]

DEV = [{"key": f"046d:085e:CAM{i}", "present": True, "in_use": False, "speed": "super", "errors_total": 0,
        "resets_total": 0} for i in range(2)]


def make_lines(agents: int, per_agent: int, event_every: int) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for a in range(agents):
        agent = f"bench-{a:04d}"
        tel, ev = [], []
        for seq in range(1, per_agent + 1):
            t = 1_800_000_000 + seq
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"
            base = {"v": 1, "agent": agent, "boot": "benchboot01", "seq": seq, "ts": ts}
            if seq % event_every == 0:
                ev.append(json.dumps({**base, "kind": "event", "type": "device.usage",
                                      "device": {"key": DEV[0]["key"], "port": "1-2"},
                                      "context": {"in_use": seq % 2 == 0, "users": [], "meeting": False}},
                                     separators=(",", ":")))
            else:
                tel.append(json.dumps({**base, "kind": "telemetry",
                                       "host": {"cpu_pct": 3.5, "mem_pct": 41.0, "disk_pct": 63.2,
                                                "uptime_s": 86400, "temp_c": 48.0},
                                       "devices": DEV}, separators=(",", ":")))
        out[(agent, "telemetry")] = tel
        out[(agent, "events")] = ev
    return out


def counter(db: Path, name: str) -> float:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return float(row[0]) if row else 0.0
    except sqlite3.Error:
        return 0.0


def metric(url: str, name: str) -> float:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--agents", type=int, default=40)
    ap.add_argument("--workers", type=int, default=int(os.environ.get("PANTAU_INGEST_WORKERS", "0")) or None)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    per_agent = args.messages // args.agents
    n = per_agent * args.agents
    lines = make_lines(args.agents, per_agent, event_every=10)
    tmp = Path(tempfile.mkdtemp(prefix="pantau-bench-"))
    files = {}
    for (agent, channel), ls in lines.items():
        f = tmp / f"{agent}-{channel}.txt"
        f.write_text("\n".join(ls) + "\n")
        files[(agent, channel)] = f
    broker = Broker()
    http = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PANTAU_BROKER": f"mqtt://127.0.0.1:{broker.port}", "PANTAU_DB": str(tmp / "c.sqlite"),
           "PANTAU_HTTP": http}
    if args.workers:
        env["PANTAU_INGEST_WORKERS"] = str(args.workers)
    coll = subprocess.Popen([sys.executable, "-m", "collector.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "collector.log", "wb"))  # noqa: SIM115
    url = f"http://{http}"
    deadline = time.monotonic() + 30
    while "subscribed" not in (tmp / "collector.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "pantau/v1/#",
                            "-q", "1", "-C", str(n)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    proc = psutil.Process(coll.pid)

    def cpu_s() -> float:
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    cpu0 = cpu_s()
    t0 = time.monotonic()
    pubs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "0", "-l",
                              "-t", f"pantau/v1/agents/{agent}/{channel}"], stdin=open(f, "rb"))  # noqa: SIM115
            for (agent, channel), f in files.items()]
    sub_done = coll_done = None
    cpu_used = 0.0
    rss: list[tuple[float, float]] = []
    while time.monotonic() - t0 < args.timeout:
        now = time.monotonic()
        if sub_done is None and sub.poll() is not None:
            sub_done = now - t0
        stored = counter(tmp / "c.sqlite", "stored")  # read from the store: an HTTP scrape would cost the collector CPU
        kids = [proc, *proc.children(recursive=True)]
        rss.append((stored / n, sum(p.memory_info().rss for p in kids if p.is_running()) / 2**20))
        if stored >= n and coll_done is None:
            coll_done = now - t0
            cpu_used = cpu_s() - cpu0
        if sub_done is not None and coll_done is not None:
            break
        time.sleep(0.2)
    for p in pubs:
        p.wait(10)
    received = metric(url, "pantau_messages_received_total")
    coll.terminate()
    coll.wait(30)
    sub.kill()
    broker.stop()
    print(f"messages: {n} from {args.agents} agents ({int(n * 0.9)} telemetry, {n // 10} events), "
          f"{len(pubs)} mosquitto_pub processes")
    if sub_done is None or coll_done is None:
        print(f"INCOMPLETE after {args.timeout:.0f} s: mosquitto_sub done={sub_done}, collector stored "
              f"{rss[-1][0] * n:.0f} of {n} (received {received:.0f})")
        return
    sub_rate, coll_rate = n / sub_done, n / coll_done
    print(f"mosquitto_sub: {sub_done:6.2f} s  {sub_rate:9.0f} msg/s")
    print(f"collector:     {coll_done:6.2f} s  {coll_rate:9.0f} msg/s  (committed to SQLite)")
    print(f"ratio collector/mosquitto_sub: {coll_rate / sub_rate:.2f}  (target >= 0.5)")
    print(f"collector CPU: {cpu_used:.1f} s, {cpu_used / n * 1e6:.0f} us per message (the ratio is noisy on a "
          "shared machine; CPU per message is not)")
    marks = []
    for q in (0.25, 0.5, 0.75, 1.0):
        at = [m for f, m in rss if f >= q]
        if at:
            marks.append(f"{int(q * 100)}%: {at[0]:.0f} MB")
    print(f"collector RSS as the stream grows: {', '.join(marks)}; peak {max(m for _, m in rss):.0f} MB")


if __name__ == "__main__":
    main()
