"""The evaluator of classification policy v1: evidence timeline -> incidents.

A pure function of one agent's ordered evidence and the clock, so that replay, the live
collector and a re-run after a rule change all agree. Late evidence simply changes the
input; an incident whose condition no longer holds does not come out (the incident
store records it as withdrawn).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from collector.policy import RULES_BY_ID, Rule, Windows, rules_for
from collector.timeline import AgentHistory, Evidence
from common.protocol import ERROR_CODES, format_epoch

_RESTART_ANCHORS = ("agent.started", "host.resumed")


@dataclass
class Incident:
    kind: str
    agent: str
    device: str
    trouble: list[Evidence] = field(default_factory=list)
    resolving: list[Evidence] = field(default_factory=list)
    resolved_ts: float | None = None
    resolved_at: str | None = None
    mark: Evidence | None = None
    rule: Rule | None = None
    device_info: dict[str, Any] = field(default_factory=dict)
    order: tuple[int, int] = (0, 0)

    @property
    def first(self) -> Evidence:
        return self.trouble[0]

    @property
    def opened_at(self) -> str:
        return self.first.ts_str

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

    def evidence(self, rank: dict[str, int]) -> list[dict[str, Any]]:
        items = list(self.trouble) + ([self.mark] if self.mark else []) + list(self.resolving)
        uniq = {(e.boot, e.seq, e.synthetic, e.key): e for e in items}.values()
        ordered = sorted(uniq, key=lambda e: (rank.get(e.boot, 0), e.seq, e.synthetic))
        out = []
        for e in ordered:
            ref = e.ref()
            if e.synthetic:  # the agent.started at which the device was found absent
                ref["type"] = "agent.started"
            out.append(ref)
        return out

    def to_json(self, rank: dict[str, int], lang: str = "id") -> dict[str, Any]:
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
            "opened_at": self.opened_at,
            "resolved_at": self.resolved_at,
            "evidence": self.evidence(rank),
            "summary": summary(self, lang),
        }


_KIND_NAMES = {
    "id": {"camera": "Kamera", "speakerphone": "Speakerphone", "speaker": "Speaker", "microphone": "Mikrofon"},
    "en": {"camera": "Camera", "speakerphone": "Speakerphone", "speaker": "Speaker", "microphone": "Microphone"},
}
_WHAT = {
    "id": {"device_error": "mengalami error", "device_missing": "hilang dari PC ruangan",
           "device_unstable": "berulang kali terputus"},
    "en": {"device_error": "reported errors", "device_missing": "went missing from the room PC",
           "device_unstable": "kept dropping off"},
}


def summary(inc: Incident, lang: str = "id") -> str:
    lang = lang if lang in _KIND_NAMES else "id"
    info = inc.device_info
    kind_name = _KIND_NAMES[lang].get(str(info.get("kind")), "Perangkat" if lang == "id" else "Device")
    product = info.get("product") or inc.device
    rule = inc.rule
    assert rule is not None
    since = inc.opened_at[:16].replace("T", " ")
    head = f"{kind_name} {product} di {inc.agent}" if lang == "id" else f"{kind_name} {product} at {inc.agent}"
    when = f"sejak {since} UTC" if lang == "id" else f"since {since} UTC"
    why = rule.explain_id if lang == "id" else rule.explain_en
    return f"{head} {_WHAT[lang][inc.kind]} {when}: {why}"


def _family(ev: Evidence) -> str | None:
    code = (ev.error or {}).get("code")
    return ERROR_CODES.get(code) if isinstance(code, str) else None


def _is_trouble_error(ev: Evidence) -> bool:
    return ev.type == "device.error" and _family(ev) in ("link", "device")


def _with_restart_detaches(tl: list[Evidence]) -> list[Evidence]:
    """Insert the detach implied by a device absent from the inventory after a restart."""
    out: list[Evidence] = []
    prev_listed: dict[str, dict[str, Any]] | None = None  # last inventory of the previous boot, less later detaches
    cur_boot: str | None = None
    listed: dict[str, dict[str, Any]] | None = None
    anchor: Evidence | None = None
    attached_before_inv: set[str] = set()
    first_inv_done = False
    pending: list[Evidence] = []

    def flush_boot() -> None:
        nonlocal prev_listed
        if listed is not None:
            prev_listed = dict(listed)

    for ev in tl:
        if ev.boot != cur_boot:
            if cur_boot is not None:
                flush_boot()
            cur_boot, listed, anchor, first_inv_done = ev.boot, None, None, False
            attached_before_inv = set()
        if ev.type == "agent.started" and anchor is None:
            anchor = ev
        out.append(ev)
        if ev.kind == "inventory":
            if not first_inv_done and prev_listed is not None:
                first_inv_done = True
                at = anchor or next(e for e in out if e.boot == cur_boot)
                missing = [k for k in prev_listed if k not in ev.keys and k not in attached_before_inv]
                synth = [
                    Evidence(agent=at.agent, boot=at.boot, seq=at.seq, ts=at.ts, ts_str=at.ts_str, kind="event",
                             type="device.detached", key=k, device=prev_listed[k],
                             context={"in_use": False, "users": [], "meeting": False}, synthetic=True)
                    for k in missing
                ]
                if synth:
                    idx = out.index(at) + 1
                    out[idx:idx] = synth
                    pending.extend(synth)
            first_inv_done = True
            listed = {d["key"]: d for d in ev.devices}
        elif ev.type == "device.detached" and listed is not None and ev.key in listed:
            listed.pop(ev.key, None)
        elif ev.type == "device.attached" and not first_inv_done and ev.key:
            attached_before_inv.add(ev.key)
    return out


class _Facts:
    """One pass over the timeline: what every rule condition reads."""

    def __init__(self, tl: list[Evidence], w: Windows) -> None:
        self.tl = tl
        self.w = w
        self.pos = {id(e): i for i, e in enumerate(tl)}  # timeline position of each piece of evidence
        self.marks: dict[str, list[tuple[int, Evidence]]] = defaultdict(list)
        self.seen: dict[str, list[int]] = defaultdict(list)  # device seen: attach / inventory / telemetry present
        self.attaches: dict[str, list[int]] = defaultdict(list)
        self.errors: dict[str, list[int]] = defaultdict(list)  # trouble errors
        self.detaches: list[tuple[int, bool]] = []  # (index, expected)
        self.starts: list[Evidence] = []
        self.stoppings: list[int] = []
        self.last_device: dict[str, dict[str, Any]] = {}
        suspended = False
        last_port: dict[str, str] = {}
        for i, ev in enumerate(tl):
            t = ev.type
            if t == "host.suspending":
                suspended = True
            elif t in _RESTART_ANCHORS:
                suspended = False
                self.starts.append(ev)
            elif t == "agent.stopping":
                self.stoppings.append(i)
            if ev.kind == "inventory":
                for d in ev.devices:
                    self.seen[d["key"]].append(i)
                    if isinstance(d.get("port"), str):
                        last_port[d["key"]] = d["port"]
                    self.last_device[d["key"]] = d
                continue
            if ev.kind == "telemetry":
                for k in ev.keys:
                    self.seen[k].append(i)
                continue
            key = ev.key
            if key is None:
                continue
            if ev.device:
                self.last_device[key] = {**self.last_device.get(key, {}), **ev.device}
            if t == "device.detached":
                self.detaches.append((i, suspended and not ev.synthetic))
                if ev.context.get("in_use") is True:
                    self.marks[key].append((i, ev))
            elif t == "device.attached":
                self.attaches[key].append(i)
                self.seen[key].append(i)
                port = (ev.device or {}).get("port")
                prev = last_port.get(key)
                if "@" not in key and prev is not None and isinstance(port, str) and port != prev:
                    self.marks[key].append((i, ev))
            elif t == "handling.reported":
                self.marks[key].append((i, ev))
            elif _is_trouble_error(ev):
                self.errors[key].append(i)
            port = (ev.device or {}).get("port")
            if isinstance(port, str):
                last_port[key] = port

    def _next(self, idxs: list[int], after: int) -> int | None:
        j = bisect.bisect_right(idxs, after)
        return idxs[j] if j < len(idxs) else None

    def error_between(self, key: str, lo: int, hi: int) -> bool:
        idxs = self.errors.get(key, [])
        j = bisect.bisect_right(idxs, lo)
        return j < len(idxs) and idxs[j] < hi

    def next_attach(self, key: str, after: int) -> int | None:
        return self._next(self.attaches.get(key, []), after)

    def next_seen(self, key: str, after: int) -> int | None:
        return self._next(self.seen.get(key, []), after)

    def quick_idle_replug(self, i: int) -> bool:
        d = self.tl[i]
        if d.synthetic or d.context.get("in_use") is True or d.key is None:
            return False
        a = self.next_attach(d.key, i)
        if a is None:
            return False
        att = self.tl[a]
        same_port = (att.device or {}).get("port") == (d.device or {}).get("port")
        return same_port and 0 <= att.ts - d.ts <= self.w.quick_replug_s and not self.error_between(d.key, i, a)


def evaluate(history: AgentHistory, clock: float, windows: Windows | None = None,
             pending: list[float] | None = None) -> list[Incident]:
    """Every incident (not withdrawn) of one agent as the evidence stands at ``clock``.

    ``pending`` receives the ends of windows still open at ``clock``: once the clock is
    past one of them the answer may change, so the caller evaluates again then.
    """
    pending = pending if pending is not None else []
    w = windows or Windows()
    tl = _with_restart_detaches(history.ordered())
    rank = history.boot_rank()
    f = _Facts(tl, w)

    unexpected: list[int] = [i for i, exp in f.detaches if not exp and not f.quick_idle_replug(i)]
    trouble_idx: list[int] = sorted(unexpected + [i for idxs in f.errors.values() for i in idxs])
    trouble_ts = sorted((tl[i].ts, tl[i].key or "") for i in trouble_idx)

    incidents: list[Incident] = []
    incidents += _error_incidents(tl, f, w)
    incidents += _missing_incidents(tl, f, w, unexpected, clock, pending)
    incidents += _unstable_incidents(tl, f, w, clock, pending)

    for inc in incidents:
        inc.device_info = f.last_device.get(inc.device, {})
        inc.order = (rank.get(inc.first.boot, 0), inc.first.seq)
        inc.rule = _first_matching_rule(inc, f, w, trouble_ts)
    return incidents


def _host_wide(inc: Incident, f: _Facts, w: Windows, trouble_ts: list[tuple[float, str]]) -> bool:
    for t in inc.trouble:
        lo = bisect.bisect_left(trouble_ts, (t.ts - w.host_wide_s, ""))
        for ts, key in trouble_ts[lo:]:
            if ts > t.ts + w.host_wide_s:
                break
            if key != inc.device:
                return True
        if any(0 <= t.ts - s.ts <= w.after_start_s for s in f.starts):
            return True
    return False


def _relied_mark(inc: Incident, f: _Facts, w: Windows) -> Evidence | None:
    marks = f.marks.get(inc.device, [])
    for err in inc.trouble:
        ei = f.pos[id(err)]
        for mi, m in marks:  # the earliest mark in the window: it started the episode
            if mi < ei and 0 <= err.ts - m.ts <= w.handling_s:
                return m
    return None


def _first_matching_rule(
    inc: Incident, f: _Facts, w: Windows, trouble_ts: list[tuple[float, str]]
) -> Rule:
    for rule in rules_for(inc.kind):
        rid = rule.id
        if rid == "H1" and _host_wide(inc, f, w, trouble_ts):
            return rule
        if rid == "D1":
            mark = _relied_mark(inc, f, w)
            if mark is not None:
                inc.mark = mark
                return rule
        if rid == "D2" and any(_family(e) == "device" for e in inc.trouble):
            return rule
        if rid == "D3" and all(_family(e) == "link" for e in inc.trouble):
            return rule
        if rid == "M1" and inc.trouble[-1].context.get("in_use") is True:
            return rule
        if rid in ("M2", "U1"):
            return rule
    return RULES_BY_ID["D3"]  # unreachable with policy v1: every error is link or device


def _join_or_open(
    current: Incident | None, ev: Evidence, kind: str, key: str, w: Windows, out: list[Incident]
) -> Incident:
    """New trouble joins the open incident, reopens one resolved within 7 days, else opens one."""
    if current is not None and (current.resolved_ts is None or ev.ts <= current.resolved_ts + w.reopen_s):
        if current.resolved_ts is not None:
            current.reopen()
        current.trouble.append(ev)
        return current
    inc = Incident(kind=kind, agent=ev.agent, device=key, trouble=[ev])
    out.append(inc)
    return inc


def _error_incidents(tl: list[Evidence], f: _Facts, w: Windows) -> list[Incident]:
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


def _dropped_by_stop(f: _Facts, i: int, end: float) -> bool:
    return any(s > i and f.tl[s].ts <= end for s in f.stoppings)


def _missing_incidents(
    tl: list[Evidence], f: _Facts, w: Windows, unexpected: list[int], clock: float, pending: list[float]
) -> list[Incident]:
    out: list[Incident] = []
    current: dict[str, Incident] = {}
    for i in unexpected:
        d = tl[i]
        key = d.key
        assert key is not None
        end = d.ts + w.missing_s
        s = f.next_seen(key, i)
        if s is not None and tl[s].ts <= end:
            continue  # came back within the window
        if _dropped_by_stop(f, i, end):
            continue  # a clean stop dropped the window
        if not clock > end:
            pending.append(end)
            continue
        inc = _join_or_open(current.get(key), d, "device_missing", key, w, out)
        current[key] = inc
        if s is not None:
            inc.resolve(tl[s], tl[s].ts, tl[s].ts_str)
    return out


def _unstable_incidents(
    tl: list[Evidence], f: _Facts, w: Windows, clock: float, pending: list[float]
) -> list[Incident]:
    out: list[Incident] = []
    cycles: dict[str, list[tuple[int, int]]] = defaultdict(list)
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, expected in f.detaches:
        key = tl[i].key
        if not expected and key is not None and not tl[i].synthetic:
            by_key[key].append(i)
    for key, dets in by_key.items():
        for n, i in enumerate(dets):
            a = f.next_attach(key, i)
            nxt = dets[n + 1] if n + 1 < len(dets) else None
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
            window_ok = tl[last_a].ts - tl[first_d].ts <= w.unstable_s
            if not window_ok or f.error_between(key, first_d - 1, last_a):
                continue
            burst = [tl[c[0]] for c in cyc[j + 1 - need : j + 1]]
            if inc is not None and inc.resolved_ts is not None and burst[0].ts <= inc.resolved_ts + w.reopen_s:
                inc.reopen()
                inc.trouble.extend(e for e in burst if e not in inc.trouble)
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



def sort_key(inc: Incident) -> tuple[float, str, tuple[int, int]]:
    return (inc.first.ts, inc.agent, inc.order)
