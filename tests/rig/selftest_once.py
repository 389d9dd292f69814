"""Run the agent's idle self-test once on given nodes, inside the rig's guest, and print the
events it produces: one wire message (JSON) a line, each checked by the protocol's own decoder.

    python3 selftest_once.py camera /dev/video9 [--first-frame-s 2]
    python3 selftest_once.py microphone /dev/snd/pcmC7D1c

The path is the agent's own from "device attached" to the wire: its configuration, the Linux
platform's choice of tests and captures (V4L2, ALSA), the scheduler with its idle guard and
worker thread, and the events. Only the sysfs lookup from a USB device to its nodes is left
out: the nodes are given, so kernel test drivers (vivid, snd-aloop) can stand in for a device.
The scheduler's log line (duration, CPU, guard checks) goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import uuid

from agent.config import AgentConfig
from agent.platforms.linux import LinuxPlatform
from agent.runner import make_scheduler
from agent.watch import Tick
from common.protocol import decode_message, encode, envelope, topic_for

AGENT = "rig-selftest"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("camera", "microphone", "speakerphone"))
    ap.add_argument("nodes", nargs="+")
    ap.add_argument("--first-frame-s", type=float, default=AgentConfig.self_test_first_frame_s)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    cfg = AgentConfig(agent_id=AGENT, self_test_settle_s=0, self_test_daily_at="off",
                      self_test_first_frame_s=args.first_frame_s)
    wake = threading.Event()
    sched = make_scheduler(cfg, LinuxPlatform(cfg), wake)
    assert sched is not None
    dev = {"key": f"rig:{args.nodes[0]}", "kind": args.kind}
    sched.attached([dev["key"]])
    sched.tick(Tick(devices=[dev], now=time.monotonic()), {dev["key"]: args.nodes})
    if sched.worker is None:
        print(f"selftest_once: the platform has no self-test for a {args.kind} with nodes {args.nodes}",
              file=sys.stderr)
        return 2
    sched.worker.join(120)
    if sched.worker.is_alive():
        print("selftest_once: the self-test did not finish in 120 s", file=sys.stderr)
        return 3
    boot = uuid.uuid4().hex
    for seq, ev in enumerate(sched.events(), 1):
        body = dict(ev)
        msg = envelope(AGENT, boot, seq, "event", type=body.pop("type"), **body)
        raw = encode(msg)
        decode_message(topic_for(AGENT, "events"), raw)  # raises on anything the collector would refuse
        print(raw.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
