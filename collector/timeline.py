"""Evidence per agent, ordered by (boot order, seq) and never by arrival.

Boots are ordered by the ``ts`` of their ``agent.started`` (else their earliest ``ts``).
Only what the policy needs is kept: events, inventories, and the keys telemetry saw
present. Duplicates ``(agent, boot, seq)`` are applied once: the first copy wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.protocol import Message, ProtocolError, ts_seconds


@dataclass(slots=True)
class Evidence:
    agent: str
    boot: str
    seq: int  # -1 for messages without seq (a will)
    ts: float
    ts_str: str
    kind: str  # state | inventory | telemetry | event
    type: str  # event type, or the kind for non-events
    key: str | None = None  # device key for device events
    device: dict[str, Any] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    keys: tuple[str, ...] = ()  # inventory: listed keys; telemetry: keys present
    devices: tuple[dict[str, Any], ...] = ()  # inventory device objects
    synthetic: bool = False  # derived by the engine (absent after restart)

    def ref(self) -> dict[str, Any]:
        return {"boot": self.boot, "seq": self.seq, "type": self.type, "ts": self.ts_str}


def evidence_from(msg: Message, stamped_ts: str | None = None) -> Evidence | None:
    """Reduce a validated message to what the policy reads; None if it reads nothing."""
    p = msg.payload
    ts_str = p.get("ts") or stamped_ts
    if ts_str is None:
        return None
    seq = p.get("seq")
    base = dict(agent=msg.agent, boot=msg.boot, seq=-1 if seq is None else seq, ts=ts_seconds(ts_str), ts_str=ts_str)
    kind = msg.kind
    if kind == "event":
        dev = p.get("device") if isinstance(p.get("device"), dict) else None
        return Evidence(
            **base, kind=kind, type=p["type"], key=dev["key"] if dev else None, device=dev,
            context=p.get("context") or {}, error=p.get("error") if isinstance(p.get("error"), dict) else None,
        )
    if kind == "inventory":
        devs = tuple(d for d in p["devices"])
        return Evidence(**base, kind=kind, type=kind, keys=tuple(d["key"] for d in devs), devices=devs)
    if kind == "telemetry":
        present = tuple(d["key"] for d in p["devices"] if d.get("present") is True)
        if not present:
            return None
        return Evidence(**base, kind=kind, type=kind, keys=present)
    return Evidence(**base, kind=kind, type=f"state.{p.get('state')}", context={"reason": p.get("reason")})


class CaptureClock:
    """The clock policy windows run on: the latest valid ``ts`` seen (replay and live alike)."""

    def __init__(self) -> None:
        self.t: float | None = None
        self.ts: str | None = None

    def advance(self, ts: str) -> None:
        t = ts_seconds(ts)
        if self.t is None or t > self.t:
            self.t, self.ts = t, ts

    def stamp(self, msg_ts: str | None, received_at: str | None, fallback: str | None = None) -> str | None:
        """The time of a message: its own ``ts``; for a will, a valid ``received_at``, else the clock
        as it stands, else ``fallback``."""
        if msg_ts is not None:
            return msg_ts
        if received_at is not None:
            try:
                ts_seconds(received_at)
                return received_at
            except ProtocolError:
                pass
        return self.ts or fallback


class AgentHistory:
    """All evidence of one agent; ``ordered()`` gives the policy's timeline."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.items: list[Evidence] = []
        self._seen: set[tuple[str, int]] = set()
        self._boot_start: dict[str, float] = {}
        self._boot_first: dict[str, float] = {}
        self._sorted = True

    def add(self, ev: Evidence) -> bool:
        """Add evidence; False if ``(boot, seq)`` was already applied."""
        if ev.seq >= 0:
            ident = (ev.boot, ev.seq)
            if ident in self._seen:
                return False
            self._seen.add(ident)
        self.items.append(ev)
        if ev.type == "agent.started" and ev.boot not in self._boot_start:
            self._boot_start[ev.boot] = ev.ts
        first = self._boot_first.get(ev.boot)
        if first is None or ev.ts < first:
            self._boot_first[ev.boot] = ev.ts
        self._sorted = False
        return True

    def prune(self, before: float) -> int:
        """Forget evidence older than ``before`` (boot order is kept); returns how many went."""
        keep = [e for e in self.items if e.ts >= before]
        gone = len(self.items) - len(keep)
        self.items = keep
        return gone

    def seen(self, boot: str, seq: int) -> bool:
        return (boot, seq) in self._seen

    def boot_rank(self) -> dict[str, int]:
        boots = sorted(self._boot_first, key=lambda b: (self._boot_start.get(b, self._boot_first[b]), b))
        return {b: i for i, b in enumerate(boots)}

    def ordered(self) -> list[Evidence]:
        if not self._sorted:
            rank = self.boot_rank()
            # A will (seq -1) closes its boot: it is the last word of that boot.
            self.items.sort(key=lambda e: (rank[e.boot], e.seq if e.seq >= 0 else float("inf"), e.ts))
            self._sorted = True
        return self.items
