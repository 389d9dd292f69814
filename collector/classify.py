"""The evaluator of classification policy 1.1: one agent's evidence timeline -> incidents.

A pure function of one agent's ordered evidence and that agent's own clock, so that replay, the
live collector and a re-run after a rule change all agree. Late evidence simply changes the
input; an incident whose condition no longer holds does not come out (the incident book
records it as withdrawn). The rules themselves, with their conditions, are rows in ``policy.py``.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

from collector.policy import (
    DEVICE_KIND_NAMES,
    INCIDENT_PHRASES,
    POLICY_VERSION,
    RULES_BY_ID,
    Rule,
    Windows,
    rules_for,
)
from collector.timeline import AgentHistory, Evidence, is_dashboard_boot
from common.protocol import ERROR_CODES, DeviceObject, format_epoch

_ANCHORS = ("agent.started", "host.resumed")


@dataclass(eq=False)
class Incident:
    kind: str
    agent: str
    device: str
    trouble: list[Evidence] = field(default_factory=list)
    resolving: list[Evidence] = field(default_factory=list)
    anchors: list[Evidence] = field(default_factory=list)  # the start/resume a carried or unwatched window ran from
    unwatched: list[Evidence] = field(default_factory=list)  # trouble nobody saw happen: never host-wide
    resolved_ts: float | None = None
    resolved_at: str | None = None
    mark: Evidence | None = None
    rule: Rule | None = None
    device_info: DeviceObject | dict[str, Any] = field(default_factory=dict)
    order: float = 0.0  # timeline position of its first evidence

    @property
    def first(self) -> Evidence:
        return self.trouble[0]

    @property
    def opened_at(self) -> str:
        return self.first.ts_str

    def needs_from(self, w: Windows) -> float:
        """The oldest ts of evidence this decision may read: once pruning passes it, the incident is final."""
        lookback = max(w.host_wide_s, w.after_start_s)  # another device's trouble, a start or resume before it
        if self.kind == "device_error":
            lookback = max(lookback, w.handling_s)  # and the handling mark D1 may rely on
        return self.first.ts - lookback  # (the inventory an absence was derived from is pinned instead)

    def settled(self, clock: float, w: Windows) -> bool:
        """Resolved long enough ago that no new trouble can reopen it."""
        return self.resolved_ts is not None and clock > self.resolved_ts + w.reopen_s

    @property
    def id(self) -> str:
        f = self.first
        raw = f"{self.agent}|{self.device}|{self.kind}|{f.boot}|{f.seq}|{f.synthetic}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def resolve(self, ev: Evidence | None, ts: float, ts_str: str) -> None:
        if ev is not None:
            self.resolving.append(ev)
        self.resolved_ts, self.resolved_at = ts, ts_str

    def reopen(self) -> None:
        self.resolved_ts, self.resolved_at = None, None

    def evidence(self) -> list[dict[str, Any]]:
        """Trouble, the relied-on mark, anchors and resolving events, in timeline order."""
        items = [*self.trouble, *([self.mark] if self.mark else []), *self.anchors, *self.resolving]
        out: dict[tuple[str, int, str], tuple[float, dict[str, Any]]] = {}
        for e in items:
            ref = e.ref()
            if e.synthetic:  # the agent.started at which the device was found absent
                ref["type"] = "agent.started"
            out.setdefault((e.boot, e.seq, ref["type"]), (e.pos, ref))
        return [ref for _, ref in sorted(out.values(), key=lambda p: p[0])]

    def to_json(self, lang: str = "id") -> dict[str, Any]:
        rule = self.rule
        assert rule is not None
        return {
            "id": self.id,
            "kind": self.kind,
            "agent": self.agent,
            "device": self.device,
            "cause": rule.cause,
            "responsible": rule.responsible,
            "confidence": rule.confidence,
            "rule": rule.id,
            "policy": POLICY_VERSION,
            "opened_at": self.opened_at,
            "resolved_at": self.resolved_at,
            "evidence": self.evidence(),
            "summary": summary(self, lang),
        }


def summary(inc: Incident, lang: str = "id") -> str:
    lang = lang if lang in DEVICE_KIND_NAMES else "id"
    info = inc.device_info
    names = DEVICE_KIND_NAMES[lang]
    kind_name = names.get(info.get("kind")) or names[None]
    product = info.get("product") or inc.device
    rule = inc.rule
    assert rule is not None
    since = inc.opened_at[:16].replace("T", " ")
    head = f"{kind_name} {product} di {inc.agent}" if lang == "id" else f"{kind_name} {product} at {inc.agent}"
    when = f"sejak {since} UTC" if lang == "id" else f"since {since} UTC"
    why = rule.explain_id if lang == "id" else rule.explain_en
    return f"{head} {INCIDENT_PHRASES[lang][inc.kind]} {when}: {why}"


def _family(ev: Evidence) -> str | None:
    code = ev.error.get("code") if ev.error else None
    return ERROR_CODES.get(code) if isinstance(code, str) else None


def _has_serial(dev: DeviceObject | None, key: str) -> bool:
    """A ``null`` or empty ``serial`` means no serial; without the member, the key says (``vid:pid@port``)."""
    if dev is not None and "serial" in dev:
        s = dev.get("serial")
        return isinstance(s, str) and bool(s.strip())
    return "@" not in key


def _is_trouble_error(ev: Evidence) -> bool:
    return ev.type == "device.error" and _family(ev) in ("link", "device")


def _with_restart_detaches(tl: list[Evidence]) -> list[Evidence]:
    """Unwatched absence (b): a device in the previous boot's last inventory, with no detach seen
    after it, absent from the first inventory after the next ``agent.started``, counts as detached
    (not in use) at that ``agent.started``. A detach seen after that inventory — later in its boot, in a
    boot that sent no inventory, or in the new boot before its first inventory — takes the device out:
    it is judged by that detach."""
    out: list[Evidence] = []
    listed: dict[str, DeviceObject] | None = None  # the latest inventory, less the detaches seen after it
    listed_inv: Evidence | None = None  # that inventory
    cur_boot: str | None = None
    anchor: Evidence | None = None
    attached_before_inv: set[str] = set()
    first_inv_done = False
    for ev in tl:
        if is_dashboard_boot(ev.boot):
            out.append(ev)
            continue
        if ev.boot != cur_boot:
            cur_boot, anchor, first_inv_done, attached_before_inv = ev.boot, None, False, set()
        if ev.type == "agent.started" and anchor is None:
            anchor = ev
        out.append(ev)
        if ev.kind == "inventory":
            if not first_inv_done and listed is not None and anchor is not None:
                at = anchor  # ``listed`` is still an earlier boot's: this is the boot's first inventory
                missing = [k for k in listed if k not in ev.keys and k not in attached_before_inv]
                synth = [
                    Evidence(agent=at.agent, boot=at.boot, seq=at.seq, ts=at.ts, ts_str=at.ts_str, kind="event",
                             type="device.detached", key=k, device=listed[k],
                             context={"in_use": False, "users": [], "meeting": False}, synthetic=True,
                             basis=listed_inv)
                    for k in missing
                ]
                if synth:
                    idx = out.index(at) + 1
                    out[idx:idx] = synth
            first_inv_done = True
            listed, listed_inv = {d["key"]: d for d in ev.devices}, ev
        elif ev.type == "device.detached" and listed is not None:
            listed.pop(ev.key or "", None)
        elif ev.type == "device.attached" and not first_inv_done and ev.key:
            attached_before_inv.add(ev.key)
    return out


@dataclass
class _Boot:
    boot: str
    start: Evidence | None = None  # its first agent.started
    first: Evidence | None = None
    end_ts: float = float("-inf")  # the latest ts of any of its messages (a will's stamp aside)
    ended: bool = False  # agent.stopping or a will seen (or a later boot exists)
    first_inventory: frozenset[str] | None = None
    next: _Boot | None = None

    @property
    def anchor(self) -> Evidence:
        a = self.start or self.first
        assert a is not None
        return a


class _Facts:
    """One pass over the timeline: what every rule condition and window reads."""

    def __init__(self, tl: list[Evidence], w: Windows, boot_last: dict[str, float] | None = None) -> None:
        self.tl = tl
        self.w = w
        self.boot_last = boot_last or {}
        self.marks: dict[str, list[Evidence]] = defaultdict(list)
        self.seen: dict[str, list[int]] = defaultdict(list)  # device seen: attach / inventory / telemetry present
        self.attaches: dict[str, list[int]] = defaultdict(list)
        self.detach_idx: dict[str, list[int]] = defaultdict(list)
        self.errors: dict[str, list[int]] = defaultdict(list)  # trouble errors
        self.detaches: list[tuple[int, Evidence | None]] = []  # (index, the resume/start ending its sleep, if asleep)
        self.asleep: set[int] = set()
        self.starts: list[Evidence] = []
        self.boot_of: list[_Boot | None] = []
        self.last_device: dict[str, DeviceObject] = {}
        self._mark_cache: dict[int, Evidence | None] = {}
        self._sleep_end: dict[int, Evidence] = {}  # sleep detach -> the host.resumed that ended that sleep
        self.trouble_ts: list[tuple[float, str]] = []
        self._scan()

    def _scan(self) -> None:
        boots: dict[str, _Boot] = {}
        order: list[_Boot] = []
        suspended = False
        last_port: dict[str, str] = {}
        sleeping: list[int] = []  # detaches during the current sleep
        for i, ev in enumerate(self.tl):
            ev.pos = float(i) + (0.5 if ev.synthetic else 0.0)
            if is_dashboard_boot(ev.boot):
                self.boot_of.append(None)
            else:
                b = boots.get(ev.boot)
                if b is None:
                    b = boots[ev.boot] = _Boot(ev.boot, first=ev, end_ts=self.boot_last.get(ev.boot, float("-inf")))
                    if order:
                        order[-1].next, order[-1].ended = b, True
                        suspended, sleeping = False, []  # a sleep that no resume ended: judged from this start
                    order.append(b)
                self.boot_of.append(b)
                if ev.seq >= 0 and not ev.synthetic:  # a will has no ts of its own: it dates nothing
                    b.end_ts = max(b.end_ts, ev.ts)
                if ev.type == "agent.started" and b.start is None and not ev.synthetic:
                    b.start = ev
                if ev.type == "agent.stopping" or (ev.seq < 0 and ev.type == "state.offline"):
                    b.ended = True
                if ev.kind == "inventory" and b.first_inventory is None:
                    b.first_inventory = frozenset(ev.keys)
            t = ev.type
            if t == "host.suspending":
                suspended = True
            elif t in _ANCHORS and not ev.synthetic:
                if t == "host.resumed":
                    for j in sleeping:
                        self._sleep_end[j] = ev
                suspended, sleeping = False, []
                self.starts.append(ev)
            self._device(i, ev, suspended, sleeping, last_port)

    def _device(self, i: int, ev: Evidence, suspended: bool, sleeping: list[int], last_port: dict[str, str]) -> None:
        t = ev.type
        if ev.kind == "inventory":
            for d in ev.devices:
                self.seen[d["key"]].append(i)
                port = d.get("port")
                if isinstance(port, str):
                    last_port[d["key"]] = port
                self.last_device[d["key"]] = d
            return
        if ev.kind == "telemetry":
            for k in ev.keys:
                self.seen[k].append(i)
            return
        key = ev.key
        if key is None:
            return
        if ev.device:
            self.last_device[key] = cast(DeviceObject, {**self.last_device.get(key, {}), **ev.device})
        if t == "device.detached":
            self.detaches.append((i, None))
            self.detach_idx[key].append(i)
            if suspended and not ev.synthetic:
                self.asleep.add(i)
                sleeping.append(i)
            if ev.context.get("in_use") is True:
                self.marks[key].append(ev)
        elif t == "device.attached":
            self.attaches[key].append(i)
            self.seen[key].append(i)
            port = ev.device.get("port") if ev.device else None
            prev = last_port.get(key)
            if _has_serial(ev.device, key) and prev is not None and isinstance(port, str) and port != prev:
                self.marks[key].append(ev)
        elif t == "handling.reported":
            if not ev.mismatch:
                self.marks[key].append(ev)
        elif _is_trouble_error(ev):
            self.errors[key].append(i)
        port = ev.device.get("port") if ev.device else None
        if isinstance(port, str):
            last_port[key] = port

    def sleep_end(self, i: int) -> Evidence | None:
        return self._sleep_end.get(i)

    @staticmethod
    def _next(idxs: list[int], after: int) -> int | None:
        j = bisect.bisect_right(idxs, after)
        return idxs[j] if j < len(idxs) else None

    def error_between(self, key: str, lo: int, hi: int) -> bool:
        idxs = self.errors.get(key, [])
        j = bisect.bisect_right(idxs, lo)
        return j < len(idxs) and idxs[j] < hi

    def next_attach(self, key: str, after: int) -> int | None:
        return self._next(self.attaches.get(key, []), after)

    def next_detach(self, key: str, after: int) -> int | None:
        return self._next(self.detach_idx.get(key, []), after)

    def next_seen(self, key: str, after: int) -> int | None:
        return self._next(self.seen.get(key, []), after)

    def quick_idle_replug(self, i: int) -> bool:
        d = self.tl[i]
        if d.synthetic or i in self.asleep or d.context.get("in_use") is True or d.key is None:
            return False
        a = self.next_attach(d.key, i)
        if a is None:
            return False
        att = self.tl[a]
        same_port = (att.device.get("port") if att.device else None) == (d.device.get("port") if d.device else None)
        return same_port and 0 <= att.ts - d.ts <= self.w.quick_replug_s and not self.error_between(d.key, i, a)

    # ------------------------------------------------------------------ what rule predicates ask
    def bind(self, trouble_ts: list[tuple[float, str]]) -> None:
        self.trouble_ts = trouble_ts

    def host_wide(self, inc: Incident) -> bool:
        w = self.w
        for t in inc.trouble:
            if any(t is u for u in inc.unwatched):
                continue  # nobody saw when or why it went
            lo = bisect.bisect_left(self.trouble_ts, (t.ts - w.host_wide_s, ""))
            for ts, key in self.trouble_ts[lo:]:
                if ts > t.ts + w.host_wide_s:
                    break
                if key != inc.device:
                    return True
            if any(0 <= t.ts - s.ts <= w.after_start_s for s in self.starts):
                return True
        return False

    def relied_mark(self, inc: Incident) -> Evidence | None:
        """The earliest handling mark in the 24 h before the first error that has one."""
        if id(inc) in self._mark_cache:
            return self._mark_cache[id(inc)]
        found: Evidence | None = None
        if inc.kind == "device_error":
            marks = self.marks.get(inc.device, [])
            for err in inc.trouble:
                found = next((m for m in marks if m.pos < err.pos and 0 <= err.ts - m.ts <= self.w.handling_s), None)
                if found is not None:
                    break
        self._mark_cache[id(inc)] = found
        return found

    def families(self, inc: Incident) -> frozenset[str]:
        return frozenset(f for f in (_family(e) for e in inc.trouble) if f is not None)

    def in_use_at_latest_detach(self, inc: Incident) -> bool:
        return inc.trouble[-1].context.get("in_use") is True


def evaluate(history: AgentHistory, clock: float, windows: Windows | None = None,
             pending: list[float] | None = None, not_expected: dict[str, float] | None = None,
             keep: list[float] | None = None, pin: list[Evidence] | None = None) -> list[Incident]:
    """Every incident (not withdrawn) of one agent as the evidence stands at that agent's ``clock``.

    ``pending`` receives the ends of windows still open at ``clock``: once the clock is past one
    of them the answer may change, so the caller evaluates again then. ``not_expected`` maps a device
    key to the time from which it is no longer expected in the room (its lease ended or it was returned):
    a detach from then on opens no ``device_missing``. ``keep`` receives the ts of evidence that decisions
    not made yet will read (a detach whose window is pending or waiting, the inventory an absence after the
    next start would be judged against): the caller must not forget it, however old. ``pin`` receives
    single items to keep whatever their age: the latest inventory, which the next start's absences
    (unwatched, case b) are judged against.
    """
    pending = pending if pending is not None else []
    keep = keep if keep is not None else []
    w = windows or Windows()
    tl = _with_restart_detaches(history.ordered())
    f = _Facts(tl, w, history.boot_last)

    incidents: list[Incident] = []
    incidents += _error_incidents(tl, w)
    pin = pin if pin is not None else []
    incidents += _missing_incidents(tl, f, w, clock, pending, not_expected or {}, keep, pin)
    last_inventory = next((e for e in reversed(tl) if e.kind == "inventory"), None)
    if last_inventory is not None:
        pin.append(last_inventory)
    incidents += _unstable_incidents(tl, f, w, clock, pending)

    pin += [t.basis for inc in incidents if not inc.settled(clock, w) for t in inc.trouble if t.basis is not None]
    f.bind(sorted((t.ts, inc.device) for inc in incidents for t in inc.trouble))
    for inc in incidents:
        inc.device_info = f.last_device.get(inc.device, {})
        inc.rule = _first_matching_rule(inc, f)
        inc.mark = f.relied_mark(inc) if inc.rule.id == "D1" else None
        inc.order = min(e.pos for e in (*inc.trouble, *inc.anchors, *([inc.mark] if inc.mark else [])))
    return incidents


def _first_matching_rule(inc: Incident, f: _Facts) -> Rule:
    for rule in rules_for(inc.kind):
        if rule.holds(inc, f):
            return rule
    return RULES_BY_ID["D3"]  # unreachable: every trouble error is link or device family


def _join_or_open(current: Incident | None, ev: Evidence, kind: str, key: str, w: Windows,
                  out: list[Incident]) -> Incident:
    """New trouble joins the open incident, reopens one resolved within 7 days, else opens one."""
    if current is not None and (current.resolved_ts is None or ev.ts <= current.resolved_ts + w.reopen_s):
        if current.resolved_ts is not None:
            current.reopen()
        current.trouble.append(ev)
        return current
    inc = Incident(kind=kind, agent=ev.agent, device=key, trouble=[ev])
    out.append(inc)
    return inc


def _error_incidents(tl: list[Evidence], w: Windows) -> list[Incident]:
    out: list[Incident] = []
    current: dict[str, Incident] = {}
    for ev in tl:
        key = ev.key
        if key is None or ev.kind != "event":
            continue
        if _is_trouble_error(ev):
            current[key] = _join_or_open(current.get(key), ev, "device_error", key, w, out)
        elif ev.type == "device.recovered":
            inc = current.get(key)
            if inc is not None and inc.resolved_ts is None:
                inc.resolve(ev, ev.ts, ev.ts_str)
    return out


@dataclass
class _Window:
    """How a detach is judged: until ``end`` (on the agent's clock), from ``anchor`` if it was carried
    over a stop or the absence was unwatched. ``end`` None: waiting for the agent to start again."""

    end: float | None
    anchor: Evidence | None = None
    unwatched: bool = False


def _missing_window(f: _Facts, i: int) -> _Window | None:
    """The window a detach is judged on, or None if it is quiet whatever happens next."""
    w = f.w
    d = f.tl[i]
    boot = f.boot_of[i]
    assert boot is not None and d.key is not None
    if d.synthetic:  # unwatched (b): from the agent.started that found it absent
        start = boot.anchor
        win = _Window(start.ts + w.missing_s, start, unwatched=True)
    elif i in f.asleep:  # unwatched (a): from the resume, or from the next start if no resume came
        resumed = f.sleep_end(i)
        if resumed is not None:
            win = _Window(resumed.ts + w.missing_s, resumed, unwatched=True)
        elif boot.next is not None:
            boot = boot.next
            win = _Window(boot.anchor.ts + w.missing_s, boot.anchor, unwatched=True)
        else:
            return _Window(None, unwatched=True)
    elif f.quick_idle_replug(i):
        return None
    else:
        win = _Window(d.ts + w.missing_s)
    return _carried(boot, d.key, win, w)


def _carried(boot: _Boot, key: str, win: _Window, w: Windows) -> _Window | None:
    """Windows pending when their boot ends wait for the next agent.started: a device in that boot's
    first inventory closes the window quietly; otherwise it runs until 10 min after that start."""
    while win.end is not None and boot.ended and not boot.end_ts > win.end:
        nxt = boot.next
        if nxt is None:
            return _Window(None, win.anchor, win.unwatched)  # an agent that never starts again: waiting
        if nxt.first_inventory is not None and key in nxt.first_inventory:
            return None
        boot = nxt
        win = _Window(nxt.anchor.ts + w.missing_s, nxt.anchor, win.unwatched)
    return win


def _missing_incidents(tl: list[Evidence], f: _Facts, w: Windows, clock: float, pending: list[float],
                       not_expected: dict[str, float], keep: list[float], pin: list[Evidence]) -> list[Incident]:
    out: list[Incident] = []
    current: dict[str, Incident] = {}
    for i, _ in f.detaches:
        d = tl[i]
        key = d.key
        assert key is not None
        if key in not_expected and d.ts >= not_expected[key]:
            continue  # its lease had ended, or it was returned: no longer expected in the room
        win = _missing_window(f, i)
        if win is None:
            continue
        s = f.next_seen(key, i)
        if win.end is not None and s is not None and tl[s].ts <= win.end:
            continue  # seen again within its window
        if win.end is None or not clock > win.end:  # pending, or waiting for the next start
            if win.end is not None:
                pending.append(win.end)
            keep.append(d.ts - max(w.host_wide_s, w.after_start_s))
            if d.basis is not None:
                pin.append(d.basis)
            continue
        inc = _join_or_open(current.get(key), d, "device_missing", key, w, out)
        current[key] = inc
        if win.anchor is not None:
            inc.anchors.append(win.anchor)
        if win.unwatched:
            inc.unwatched.append(d)
        if s is not None:
            inc.resolve(tl[s], tl[s].ts, tl[s].ts_str)
    return out


def _unstable_incidents(tl: list[Evidence], f: _Facts, w: Windows, clock: float,
                        pending: list[float]) -> list[Incident]:
    out: list[Incident] = []
    cycles: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, _ in f.detaches:
        d = tl[i]
        key = d.key
        if key is None or d.synthetic or i in f.asleep:
            continue  # a detach during sleep, or one nobody saw, is not a cycle
        a = f.next_attach(key, i)
        nxt = f.next_detach(key, i)
        if a is not None and (nxt is None or a < nxt):
            cycles[key].append((i, a))
    need = max(1, w.unstable_cycles)
    for key, cyc in cycles.items():
        inc: Incident | None = None
        last_detach: Evidence | None = None
        for j, (di, _ai) in enumerate(cyc):
            d = tl[di]
            if inc is not None and inc.resolved_ts is None and last_detach is not None:
                if d.ts - last_detach.ts <= w.unstable_s:
                    inc.trouble.append(d)
                    last_detach = d
                    continue
                end = last_detach.ts + w.unstable_s
                inc.resolve(None, end, format_epoch(end))
            if j + 1 < need:
                continue
            first_d, _ = cyc[j + 1 - need]
            _, last_a = cyc[j]
            if tl[last_a].ts - tl[first_d].ts > w.unstable_s or f.error_between(key, first_d - 1, last_a):
                continue
            burst = [tl[c[0]] for c in cyc[j + 1 - need : j + 1]]
            if inc is not None and inc.resolved_ts is not None and burst[0].ts <= inc.resolved_ts + w.reopen_s:
                inc.reopen()
                inc.trouble.extend(e for e in burst if all(e is not t for t in inc.trouble))
            elif inc is None or inc.resolved_ts is not None:
                inc = Incident(kind="device_unstable", agent=d.agent, device=key, trouble=burst)
                out.append(inc)
            last_detach = d
        if inc is not None and inc.resolved_ts is None and last_detach is not None:
            end = last_detach.ts + w.unstable_s
            if clock > end:
                inc.resolve(None, end, format_epoch(end))
            else:
                pending.append(end)
    return out


def sort_key(inc: Incident) -> tuple[float, str, float]:
    """Replay's order: ``opened_at``, then agent, then the first evidence's place in the timeline."""
    return (inc.first.ts, inc.agent, inc.order)
