"""``pantau-collector replay``: re-derive incidents from a capture on the capture's clock."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

from collector.capture import Unparseable, parse_line
from collector.classify import Incident, evaluate, sort_key
from collector.policy import Windows
from collector.timeline import WILL_SEQ, AgentClocks, AgentHistory, evidence_from, is_dashboard_boot
from common.protocol import ProtocolError, decode_message, ts_seconds


@dataclass
class ReplayResult:
    incidents: list[Incident] = field(default_factory=list)
    lines: int = 0
    applied: int = 0
    unparseable: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Replayer:
    """A fresh in-memory collector fed message by message; each agent's clock is its own."""

    def __init__(self, windows: Windows | None = None) -> None:
        self.windows = windows or Windows()
        self.histories: dict[str, AgentHistory] = {}
        self.clocks = AgentClocks()
        self.result = ReplayResult()
        self._seen: set[tuple[str, str, int]] = set()  # every applied message's (agent, boot, seq)
        self._waiting: dict[str, list[Any]] = {}  # agent -> wills that came before anything dated from it

    def feed(self, topic: str, payload: bytes | dict, received_at: str | None = None) -> str:
        """Apply one message; returns "applied", "duplicate" or "rejected:<reason>"."""
        try:
            msg = decode_message(topic, payload)
        except ProtocolError as exc:
            self.result.rejected[exc.reason] += 1
            return f"rejected:{exc.reason}"
        hist = self.histories.get(msg.agent)
        ident = (msg.agent, msg.boot, WILL_SEQ if msg.seq is None else msg.seq)
        if ident in self._seen:  # any message, evidence or not: the first received copy wins
            self.result.duplicates += 1
            return "duplicate"
        self._seen.add(ident)
        # a will takes its agent's clock as it stands (before anything dated: its received_at, if valid, as the
        # live collector takes its receive time; else the agent's first clock); received_at dates nothing else
        stamp = self.clocks.stamp(msg.agent, msg.ts, _valid_ts(received_at))
        if msg.ts is not None and not is_dashboard_boot(msg.boot):
            self.clocks.advance(msg.agent, msg.ts)
        if hist is None:
            hist = self.histories[msg.agent] = AgentHistory(msg.agent)
        if msg.ts is not None and not is_dashboard_boot(msg.boot):
            hist.note(msg.boot, ts_seconds(msg.ts))
        if msg.ts is None and not stamp:  # a will before anything dated: it takes the agent's first clock
            self._waiting.setdefault(msg.agent, []).append(msg)
        ev = evidence_from(msg, stamp) if stamp else None
        if ev is not None:
            hist.add(ev)
        if msg.ts is not None and msg.agent in self._waiting and msg.agent in self.clocks.ts:
            for will in self._waiting.pop(msg.agent):
                late = evidence_from(will, self.clocks.ts[msg.agent])
                if late is not None:
                    hist.add(late)
        self.result.applied += 1
        return "applied"

    def incidents(self) -> list[Incident]:
        out: list[Incident] = []
        for agent, hist in self.histories.items():
            clock = self.clocks.t.get(agent, float("-inf"))
            out += evaluate(hist, clock, self.windows)
        out.sort(key=sort_key)
        return out



def _valid_ts(value: str | None) -> str:
    try:
        ts_seconds(value or "")
        return value or ""
    except ProtocolError:
        return ""


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
    try:  # lines end at "\n" only (a bare CR is JSON whitespace inside a line; CRLF is stripped per line)
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
            result = replay_stream(fh, windows)
    except OSError as exc:
        print(f"pantau-collector replay: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    # UTF-8 where the output takes it; \u escapes (the same JSON) where it does not
    ascii_only = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "") != "utf8"
    try:
        for inc in result.incidents:
            out.write(json.dumps(inc.to_json(lang), ensure_ascii=ascii_only, allow_nan=False) + "\n")
        out.flush()
    except BrokenPipeError:  # the reader went away (`| head`): what it took is what it wanted
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(result.rejected.items())) or "none"
    print(
        f"replay: {result.lines} lines, {result.applied} applied, {result.unparseable} unparseable, "
        f"{result.duplicates} duplicates, {sum(result.rejected.values())} rejected ({rejected}), "
        f"{len(result.incidents)} incidents",
        file=sys.stderr,
    )
    return 0
