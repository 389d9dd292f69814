"""Agent footprint: RSS and CPU of `pantau-agent run` on the simulated bus, 2 s polling, 60 s.

Targets: at most 35 MB RSS and 1 % of one core. Prints the figures and their ratio to the
targets (below 1.0 is within target). Runs against a throw-away Mosquitto. The idle self-test of
both simulated devices (docs/self-test.md) runs inside the measured window (20 s after start):
its own cost, from the agent's log (each test's duration and thread CPU time), is printed apart.

    python bench/footprint.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import re
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
    # read in a child: this directory's common.py would shadow the project's common package here
    room = subprocess.run([sys.executable, "-c", "import json; from agent.cli import DEFAULT_ROOM; "
                           "print(json.dumps(DEFAULT_ROOM))"], cwd=ROOT, capture_output=True, text=True, check=True)
    bus.write_text(room.stdout)
    broker = Broker()
    env = {**os.environ, "PANTAU_BROKER": f"mqtt://127.0.0.1:{broker.port}", "PANTAU_AGENT_ID": "footprint",
           "PANTAU_STATE_DIR": str(tmp / "state"), "PANTAU_POLL_S": "2", "PANTAU_TELEMETRY_S": "30",
           "PANTAU_SELF_TEST_SETTLE_S": "20"}
    log = tmp / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "--bus", str(bus)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
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
    tests = re.findall(r"self-test (\w+) of (\S+) on \S+: (\w+) in ([\d.]+) s, cpu ([\d.]+) s", log.read_text())
    for kind, key, outcome, took, cpu_s in tests:
        print(f"  self-test {kind} of {key}: {outcome} in {float(took):.2f} s, {float(cpu_s) * 1000:.0f} ms CPU")
    total = sum(float(t[4]) for t in tests)
    print(f"  self-tests in the window: {len(tests)}, {total * 1000:.0f} ms CPU in all "
          f"({100 * total / (t1 - t0):.3f} % of one core over the window; run once a night plus after attaches)")


if __name__ == "__main__":
    main()
