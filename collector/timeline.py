"""Evidence per agent, in the policy's timeline order, and each agent's own clock.

Policy 1.1: boots are ordered by the ``prev_boot`` chain of their ``agent.started``; where a link
is missing, by the ``ts`` of their ``agent.started`` (else their earliest ``ts``), then boot id.
Within a boot, by ``seq``; a will (no ``seq``) is the last word of its boot. A handling report made
at the dashboard (boot ``dashboard-…``) is no boot: it stands in the timeline at its ``ts``.
Only what the policy needs is kept: events, inventories, and the keys telemetry saw present.
Duplicates ``(agent, boot, seq)`` are applied once: the first copy wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.protocol import DASHBOARD_BOOT_PREFIX, DeviceObject, ErrorObject, Message, ts_seconds

WILL_SEQ = -1  # a will has no seq; it is stored and deduplicated under this one


def is_dashboard_boot(boot: str) -> bool:
    return boot.startswith(DASHBOARD_BOOT_PREFIX)


@dataclass(slots=True, eq=False)
class Evidence:
    agent: str
    boot: str
    seq: int  # WILL_SEQ for a will
    ts: float
    ts_str: str
    kind: str  # state | inventory | telemetry | event
    type: str  # event type, or the kind for non-events
    key: str | None = None  # device key for device events
    device: DeviceObject | None = None
    context: dict[str, Any] = field(default_factory=dict)
    error: ErrorObject | None = None
    keys: tuple[str, ...] = ()  # inventory: listed keys; telemetry: keys present
    devices: tuple[DeviceObject, ...] = ()  # inventory device objects
    synthetic: bool = False  # derived by the engine (absent after a restart)
    basis: Evidence | None = None  # synthetic: the inventory it was derived from
    mismatch: bool = False  # a handling report naming a device lent to another room
    pos: float = 0.0  # timeline position, set by each evaluation

    def ref(self) -> dict[str, Any]:
        return {"boot": self.boot, "seq": self.seq, "type": self.type, "ts": self.ts_str}


def evidence_from(msg: Message, stamped_ts: str | None = None, mismatch: bool = False) -> Evidence | None:
    """Reduce a validated message to what the policy reads; None if it reads nothing."""
    p = msg.payload
    ts_str = p.get("ts") or stamped_ts
    if ts_str is None:
        return None
    seq = p.get("seq")
    base: dict[str, Any] = dict(agent=msg.agent, boot=msg.boot, seq=WILL_SEQ if seq is None else seq,
                                ts=ts_seconds(ts_str), ts_str=ts_str)
    kind = msg.kind
    if kind == "event":
        dev = p.get("device") if isinstance(p.get("device"), dict) else None
        ctx = p.get("context")
        context: dict[str, Any] = ctx if isinstance(ctx, dict) else {}
        return Evidence(
            **base, kind=kind, type=p["type"], key=dev["key"] if dev else None, device=dev, context=context,
            error=p.get("error") if isinstance(p.get("error"), dict) else None, mismatch=mismatch,
        )
    if kind == "inventory":
        devs = tuple(p["devices"])
        return Evidence(**base, kind=kind, type=kind, keys=tuple(d["key"] for d in devs), devices=devs)
    if kind == "telemetry":
        present = tuple(d["key"] for d in p["devices"] if d.get("present") is True)
        if not present:
            return None
        return Evidence(**base, kind=kind, type=kind, keys=present)
    return Evidence(**base, kind=kind, type=f"state.{p.get('state')}", context={"reason": p.get("reason")})


class AgentClocks:
    """Each agent's own clock: the greatest valid ``ts`` seen from it, never moving back."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.ts: dict[str, str] = {}

    def advance(self, agent: str, ts: str, t: float | None = None) -> bool:
        """Move ``agent``'s clock to ``ts`` if that is later; True if it moved."""
        t = ts_seconds(ts) if t is None else t
        if agent in self.t and t <= self.t[agent]:
            return False
        self.t[agent], self.ts[agent] = t, ts
        return True

    def stamp(self, agent: str, msg_ts: str | None, fallback: str) -> str:
        """The time of a message: its own ``ts``; for a will, its agent's clock as it stands, or
        ``fallback`` (its receive time) when the agent has sent nothing dated yet."""
        if msg_ts is not None:
            return msg_ts
        return self.ts.get(agent, fallback)


class AgentHistory:
    """All evidence of one agent that decisions may still need; ``ordered()`` gives the timeline."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.items: list[Evidence] = []
        self._seen: set[tuple[str, int]] = set()
        self._started: dict[str, Evidence] = {}  # boot -> its first agent.started
        self._first: dict[str, float] = {}  # boot -> earliest ts
        self.boot_last: dict[str, float] = {}  # boot -> latest ts of any of its messages (evidence or not)
        self._ordered: list[Evidence] | None = None
        self._rank: dict[str, int] | None = None

    def add(self, ev: Evidence) -> bool:
        """Add evidence; False if ``(boot, seq)`` was already applied (a will: once per boot)."""
        ident = (ev.boot, ev.seq)
        if ident in self._seen:
            return False
        self._seen.add(ident)
        self.items.append(ev)
        if not is_dashboard_boot(ev.boot):
            if ev.type == "agent.started" and ev.boot not in self._started:
                self._started[ev.boot] = ev
            first = self._first.get(ev.boot)
            if ev.seq == WILL_SEQ:  # a will's stamp is no time of its boot's: it orders nothing
                self._first.setdefault(ev.boot, float("inf"))
            elif first is None or ev.ts < first:
                self._first[ev.boot] = ev.ts
        self._ordered = self._rank = None
        return True

    def note(self, boot: str, t: float) -> bool:
        """A message of ``boot`` dated ``t`` arrived (evidence or not): when that boot ended is at least then.
        True if that moved it."""
        if t > self.boot_last.get(boot, float("-inf")):
            self.boot_last[boot] = t
            return True
        return False

    def prune(self, before: float, pinned: tuple[Evidence, ...] = ()) -> int:
        """Forget evidence older than ``before``, but for ``pinned`` items; returns how many went."""
        keep = [e for e in self.items if e.ts >= before or any(e is p for p in pinned)]
        gone = len(self.items) - len(keep)
        if gone:
            self.items = keep
            self._ordered = None
        return gone

    def boot_rank(self) -> dict[str, int]:
        """Boot -> position, by the prev_boot chain; unlinked boots by their start time, then id."""
        if self._rank is not None:
            return self._rank

        def fallback(b: str) -> tuple[float, str]:
            st = self._started.get(b)
            return (st.ts if st is not None else self._first[b], b)

        boots = sorted(self._first, key=fallback)
        children: dict[str, list[str]] = {}
        heads: list[str] = []
        for b in boots:
            st = self._started.get(b)
            prev = st.context.get("prev_boot") if st is not None else None
            if isinstance(prev, str) and prev in self._first and prev != b:
                children.setdefault(prev, []).append(b)
            else:
                heads.append(b)
        order: list[str] = []
        placed: set[str] = set()

        def walk(b: str) -> None:
            stack = [b]
            while stack:
                cur = stack.pop()
                if cur in placed:
                    continue
                placed.add(cur)
                order.append(cur)
                stack.extend(reversed(children.get(cur, [])))

        for h in heads:
            walk(h)
        for b in boots:  # boots only reachable through a cycle of forged links
            walk(b)
        self._rank = {b: i for i, b in enumerate(order)}
        return self._rank

    def ordered(self) -> list[Evidence]:
        if self._ordered is not None:
            return self._ordered
        rank = self.boot_rank()
        agent_items = [e for e in self.items if not is_dashboard_boot(e.boot)]
        # A will (seq -1) closes its boot: it is the last word of that boot.
        agent_items.sort(key=lambda e: (rank[e.boot], e.seq if e.seq >= 0 else float("inf")))
        reports = sorted((e for e in self.items if is_dashboard_boot(e.boot)), key=lambda e: (e.ts, e.boot))
        if reports:
            agent_items = _place_by_ts(agent_items, reports)
        self._ordered = agent_items
        return agent_items


def _place_by_ts(timeline: list[Evidence], reports: list[Evidence]) -> list[Evidence]:
    """Insert each report after the latest stretch of the timeline dated at or before it.

    Scanning from the end, a report goes right after the last item whose ``ts`` is not later than
    its own, so a clock that went back at a restart puts it in the newest boot it fits."""
    out = list(timeline)
    for rep in reports:
        i = len(out)
        while i > 0 and out[i - 1].ts > rep.ts:
            i -= 1
        out.insert(i, rep)
    return out

