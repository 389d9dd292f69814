"""Ingest benchmark: the collector's rate to committed storage against mosquitto_sub's, in the same run.

Publishes N messages from many agents through Mosquitto: telemetry (90 %) at QoS 0 with parallel
``mosquitto_pub -l`` processes, events (10 %) at QoS 1 with paho publisher processes, so the collector's
acknowledgements after commit are exercised. ``mosquitto_sub -q 1`` and the collector(s) receive the same
stream. For each configuration it prints both rates, their ratio (target >= 0.5), the collector's CPU
per message (target <= 40 us; the ratio is noisy on a shared 2-core machine, CPU per message is not),
split into the writer process and the receiver processes, and its memory as the stream grows.

    python bench/ingest.py [--messages 200000] [--agents 40] [--runs 1]
        [--config sqlite,postgresql,postgresql*2] [--receivers N]

``postgresql*2`` is two collectors on one shared subscription writing to one PostgreSQL. SQLite serves
one collector per database file.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from common import ROOT, Broker, free_port  # type: ignore[import-not-found]
from tests.pgserver import PostgresServer  # (bench/common.py puts the project on the path)

DEV = [{"key": f"046d:085e:CAM{i}", "present": True, "in_use": False, "speed": "super", "errors_total": 0,
        "resets_total": 0} for i in range(2)]
EVENT_PUBLISHERS = 4


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


def publish_qos1(port: int, path: str) -> None:
    """A publisher process: each line ``topic<TAB>payload`` at QoS 1, a bounded window in flight."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            topic, payload = line.rstrip("\n").split("\t", 1)
            infos.append(c.publish(topic, payload.encode(), qos=1))
            if len(infos) >= 5000:
                for i in infos:
                    i.wait_for_publish(60)
                infos = []
    for i in infos:
        i.wait_for_publish(60)
    c.loop_stop()
    c.disconnect()


def stored_count(db: str) -> float:
    """Messages committed, read from the store (an HTTP scrape would cost the collector CPU)."""
    try:
        if db.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(db, connect_timeout=2) as conn:
                row = conn.execute("SELECT value FROM counters WHERE name = 'stored'").fetchone()
        else:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                row = conn.execute("SELECT value FROM counters WHERE name = 'stored'").fetchone()
        return float(row[0]) if row else 0.0
    except Exception:
        return 0.0


def db_bytes(db: str) -> float:
    """The store's size on disk: the SQLite file with its WAL, or the PostgreSQL database."""
    try:
        if db.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(db, connect_timeout=2) as conn:
                return float(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])
        return float(sum(os.path.getsize(db + ext) for ext in ("", "-wal") if os.path.exists(db + ext)))
    except Exception:
        return 0.0


def run(kind: str, collectors: int, n: int, files: dict[tuple[str, str], Path], events: list[Path],
        pg: PostgresServer | None, receivers: int | None, timeout: float) -> dict[str, Any] | None:
    tmp = Path(tempfile.mkdtemp(prefix="pantau-bench-run-"))
    broker = Broker()
    db = pg.new_database() if kind == "postgresql" and pg is not None else str(tmp / "c.sqlite")
    colls = []
    logs = []
    for i in range(collectors):
        env = {**os.environ, "PANTAU_BROKER": f"mqtt://127.0.0.1:{broker.port}", "PANTAU_DB": db,
               "PANTAU_HTTP": f"127.0.0.1:{free_port()}", "PANTAU_CLIENT_ID": f"pantau-bench-{i}",
               "PANTAU_AUDIT_KEY_FILE": str(tmp / "audit.key")}
        if receivers is not None:
            env["PANTAU_RECEIVERS"] = str(receivers)
        log = tmp / f"collector{i}.log"
        logs.append(log)
        colls.append(subprocess.Popen([sys.executable, "-m", "collector.cli", "serve"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(log, "wb")))  # noqa: SIM115
    want = max(0, (receivers if receivers is not None else 2) - 1)  # receiver 0 subscribes, the others join
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all("subscribed" in lg.read_text() and lg.read_text().count(
            "joined") >= want for lg in logs):
        time.sleep(0.1)
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "pantau/v1/#",
                            "-q", "1", "-C", str(n)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    procs = [psutil.Process(c.pid) for c in colls]

    def cpu_parts() -> tuple[float, float]:
        """(the collectors' own processes, their receiver processes), seconds of CPU."""
        parts = [0.0, 0.0]
        for proc in procs:
            for i, p in enumerate([proc, *proc.children(recursive=True)]):
                try:
                    t = p.cpu_times()
                    parts[min(i, 1)] += t.user + t.system
                except psutil.Error:
                    pass
        return parts[0], parts[1]

    def rss_mb() -> float:
        total = 0
        for proc in procs:
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        return total / 2**20

    main0, recv0 = cpu_parts()
    t0 = time.monotonic()
    pubs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "0", "-l",
                              "-t", f"pantau/v1/agents/{agent}/{channel}"], stdin=open(f, "rb"))  # noqa: SIM115
            for (agent, channel), f in files.items()]
    pubs += [subprocess.Popen([sys.executable, __file__, "--publish-qos1", str(broker.port), str(f)])
             for f in events]
    sub_done = coll_done = None
    split = (0.0, 0.0)
    rss: list[tuple[float, float]] = []
    stored = 0.0
    while time.monotonic() - t0 < timeout:
        now = time.monotonic()
        if sub_done is None and sub.poll() is not None:
            sub_done = now - t0
        stored = stored_count(db)
        rss.append((stored / n, rss_mb()))
        if stored >= n and coll_done is None:
            coll_done = now - t0
            main1, recv1 = cpu_parts()
            split = (main1 - main0, recv1 - recv0)
        if sub_done is not None and coll_done is not None:
            break
        time.sleep(0.1)
    for p in pubs:
        p.wait(30)
    size = db_bytes(db)
    for c in colls:
        c.terminate()
    for c in colls:
        c.wait(30)
    sub.kill()
    broker.stop()
    if sub_done is None or coll_done is None:
        print(f"  INCOMPLETE after {timeout:.0f} s: mosquitto_sub done={sub_done}, collector stored {stored:.0f} "
              f"of {n} (logs in {tmp})")
        return None
    marks = []
    for q in (0.25, 0.5, 0.75, 1.0):
        at = [m for f, m in rss if f >= q]
        if at:
            marks.append(f"{int(q * 100)}%: {at[0]:.0f} MB")
    return {"sub_rate": n / sub_done, "coll_rate": n / coll_done, "ratio": (n / coll_done) / (n / sub_done),
            "cpu_us": sum(split) / n * 1e6, "writer_us": split[0] / n * 1e6, "receivers_us": split[1] / n * 1e6,
            "rss": ", ".join(marks), "bytes_per_msg": size / n}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--publish-qos1":
        publish_qos1(int(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--agents", type=int, default=40)
    ap.add_argument("--runs", type=int, default=1, help="runs of each configuration (the median is printed)")
    ap.add_argument("--config", default="sqlite", help="comma-separated: sqlite, postgresql, postgresql*2")
    ap.add_argument("--receivers", type=int, default=None, help="receiver processes (default: the collector's)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    per_agent = args.messages // args.agents
    n = per_agent * args.agents
    lines = make_lines(args.agents, per_agent, event_every=10)
    tmp = Path(tempfile.mkdtemp(prefix="pantau-bench-"))
    files: dict[tuple[str, str], Path] = {}
    event_lines: list[str] = []
    for (agent, channel), ls in lines.items():
        if channel == "events":
            event_lines += [f"pantau/v1/agents/{agent}/events\t{line}" for line in ls]
            continue
        f = tmp / f"{agent}-{channel}.txt"
        f.write_text("\n".join(ls) + "\n")
        files[(agent, channel)] = f
    events = []
    for k in range(EVENT_PUBLISHERS):
        f = tmp / f"events-{k}.txt"
        f.write_text("".join(line + "\n" for line in event_lines[k::EVENT_PUBLISHERS]))
        events.append(f)
    configs = [c.strip() for c in args.config.split(",") if c.strip()]
    try:
        pg = (PostgresServer(durable=True, db_prefix="bench") if any(c.startswith("postgresql") for c in configs)
              else None)
    except FileNotFoundError as exc:
        sys.exit(f"bench: {exc}")
    print(f"messages: {n} from {args.agents} agents ({n - len(event_lines)} telemetry at QoS 0 by "
          f"{len(files)} mosquitto_pub, {len(event_lines)} events at QoS 1 by {EVENT_PUBLISHERS} paho publishers)")
    try:
        for config in configs:
            kind, _, count = config.partition("*")
            collectors = int(count or 1)
            results = []
            for r in range(args.runs):
                res = run(kind, collectors, n, files, events, pg, args.receivers, args.timeout)
                if res is None:
                    continue
                results.append(res)
                print(f"  {config} run {r + 1}: mosquitto_sub {res['sub_rate']:7.0f} msg/s, collector "
                      f"{res['coll_rate']:7.0f} msg/s, ratio {res['ratio']:.2f}, CPU {res['cpu_us']:.0f} us/msg "
                      f"(writer {res['writer_us']:.0f}, receivers {res['receivers_us']:.0f}); RSS {res['rss']}; "
                      f"store {res['bytes_per_msg']:.0f} bytes per message")
            if results:
                med = statistics.median(r["ratio"] for r in results)
                cpu = statistics.median(r["cpu_us"] for r in results)
                print(f"{config:14} median of {len(results)}: ratio collector/mosquitto_sub {med:.2f} (target >= 0.5), "
                      f"collector CPU {cpu:.0f} us per message (target <= 40)")
    finally:
        if pg is not None:
            pg.close()


if __name__ == "__main__":
    main()
