"""``pantau-collector replay``: re-derive incidents from a capture on the capture's clock."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from collector.capture import Unparseable, parse_line
from collector.classify import Incident, evaluate, sort_key
from collector.policy import Windows
from collector.timeline import AgentHistory, CaptureClock, evidence_from
from common.protocol import ProtocolError, decode_message


@dataclass
class ReplayResult:
    incidents: list[tuple[Incident, dict[str, int]]] = field(default_factory=list)
    lines: int = 0
    applied: int = 0
    unparseable: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Replayer:
    """A fresh in-memory collector fed message by message; the clock is the capture's."""

    def __init__(self, windows: Windows | None = None) -> None:
        self.windows = windows or Windows()
        self.histories: dict[str, AgentHistory] = {}
        self.clock = CaptureClock()
        self.result = ReplayResult()

    def feed(self, topic: str, payload: bytes | dict, received_at: str | None = None) -> str:
        """Apply one message; returns "applied", "duplicate" or "rejected:<reason>"."""
        try:
            msg = decode_message(topic, payload)
        except ProtocolError as exc:
            self.result.rejected[exc.reason] += 1
            return f"rejected:{exc.reason}"
        hist = self.histories.get(msg.agent)
        if msg.seq is not None and hist is not None and hist.seen(msg.boot, msg.seq):
            self.result.duplicates += 1
            return "duplicate"
        stamp = self.clock.stamp(msg.ts, received_at)
        if stamp is not None:
            self.clock.advance(stamp)
        ev = evidence_from(msg, stamp)
        if hist is None:
            hist = self.histories[msg.agent] = AgentHistory(msg.agent)
        if ev is not None:
            hist.add(ev)
        self.result.applied += 1
        return "applied"

    def incidents(self) -> list[tuple[Incident, dict[str, int]]]:
        clock = self.clock.t if self.clock.t is not None else float("-inf")
        out: list[tuple[Incident, dict[str, int]]] = []
        for hist in self.histories.values():
            rank = hist.boot_rank()
            out += [(inc, rank) for inc in evaluate(hist, clock, self.windows)]
        out.sort(key=lambda pair: sort_key(pair[0]))
        return out



def replay_stream(stream: IO[str], windows: Windows | None = None) -> ReplayResult:
    rp = Replayer(windows)
    for n, line in enumerate(stream, 1):
        rp.result.lines += 1
        try:
            rec = parse_line(line, n)
        except Unparseable:
            rp.result.unparseable += 1
            continue
        if rec is None:
            continue
        rp.feed(rec.topic, rec.payload, rec.received_at)
    rp.result.incidents = rp.incidents()
    return rp.result


def run(path: str, lang: str = "id", windows: Windows | None = None, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            result = replay_stream(fh, windows)
    except OSError as exc:
        print(f"pantau-collector replay: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for inc, rank in result.incidents:
        out.write(json.dumps(inc.to_json(rank, lang), ensure_ascii=False) + "\n")
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(result.rejected.items())) or "none"
    print(
        f"replay: {result.lines} lines, {result.applied} applied, {result.unparseable} unparseable, "
        f"{result.duplicates} duplicates, {sum(result.rejected.values())} rejected ({rejected}), "
        f"{len(result.incidents)} incidents",
        file=sys.stderr,
    )
    return 0
