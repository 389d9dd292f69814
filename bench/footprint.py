"""Agent footprint: RSS and CPU of `pantau-agent run` on the simulated bus, 2 s polling, 60 s.

Targets: at most 35 MB RSS and 1 % of one core. Prints the figures and their ratio to the
targets (below 1.0 is within target). Runs against a throw-away Mosquitto.

    python bench/footprint.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import ROOT, Broker  # type: ignore[import-not-found]

TARGET_RSS_MB = 35.0
TARGET_CPU_PCT = 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pantau-footprint-"))
    bus = tmp / "bus.json"
    sys.path.insert(0, str(ROOT))
    from agent.cli import DEFAULT_ROOM

    bus.write_text(json.dumps(DEFAULT_ROOM))
    broker = Broker()
    env = {**os.environ, "PANTAU_BROKER": f"mqtt://127.0.0.1:{broker.port}", "PANTAU_AGENT_ID": "footprint",
           "PANTAU_STATE_DIR": str(tmp / "state"), "PANTAU_POLL_S": "2", "PANTAU_TELEMETRY_S": "30"}
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "--bus", str(bus)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(agent.pid)
    time.sleep(5)  # start-up (imports, first probe) is not the steady state
    c0, t0 = proc.cpu_times(), time.monotonic()
    rss = []
    while time.monotonic() - t0 < args.seconds:
        rss.append(proc.memory_info().rss / 2**20)
        time.sleep(1)
    c1, t1 = proc.cpu_times(), time.monotonic()
    agent.terminate()
    agent.wait(20)
    broker.stop()
    cpu = 100 * ((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0)
    peak = max(rss)
    print(f"agent steady state over {t1 - t0:.0f} s, polling every 2 s (simulated bus, 2 devices):")
    print(f"  RSS: peak {peak:.1f} MB, mean {sum(rss) / len(rss):.1f} MB   target {TARGET_RSS_MB:.0f} MB   "
          f"ratio {peak / TARGET_RSS_MB:.2f}")
    print(f"  CPU: {cpu:.2f} % of one core                 target {TARGET_CPU_PCT:.0f} %     "
          f"ratio {cpu / TARGET_CPU_PCT:.2f}")


if __name__ == "__main__":
    main()
