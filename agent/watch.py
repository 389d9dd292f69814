"""The one place that diffs snapshots: attach, detach, move, usage, speed and error events.

Each tick the runner hands over what the probe sees, who holds each device, the kernel
signals read since the last tick and the probe's failures; the watcher returns protocol
events in the order they happened as far as one tick can tell (errors, detaches,
attaches, speed, usage). It observes; it never judges.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.signals.kmsg import Signal
from common.protocol import SPEED_RANK, truncate_message


@dataclass
class Usage:
    in_use: bool = False
    users: list[str] = field(default_factory=list)


@dataclass
class Tick:
    devices: list[dict[str, Any]]
    usage: dict[str, Usage] = field(default_factory=dict)
    meeting: bool = False
    signals: list[Signal] = field(default_factory=list)
    probe_failures: dict[str, int] = field(default_factory=dict)  # port -> negative errno
    device_errors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> self-reported
    now: float = 0.0


def _event(etype: str, device: dict[str, Any], context: dict[str, Any] | None = None,
           error: dict[str, Any] | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": etype, "device": device, "context": context or {}}
    if error is not None:
        ev["error"] = error
    return ev


def _error(code: str, source: str, message: str, errno: int | None = None, count: int = 1,
           problem_code: int | None = None) -> dict[str, Any]:
    return {"code": code, "source": source, "errno": errno, "problem_code": problem_code,
            "message": truncate_message(message), "count": count}


class Watcher:
    def __init__(self, recover_quiet_s: float = 600.0) -> None:
        self.recover_quiet_s = recover_quiet_s
        self.current: dict[str, dict[str, Any]] = {}
        self.last_known: dict[str, dict[str, Any]] = {}
        self.by_port: dict[str, str] = {}
        self.usage: dict[str, Usage] = {}
        self.meeting = False
        self.best_speed: dict[tuple[str, str], int] = {}
        self.errors_total: Counter[str] = Counter()
        self.resets_total: Counter[str] = Counter()
        self.active: dict[tuple[str, str], float] = {}  # (key, code) -> last seen, for kernel errors
        self.present_since: dict[str, float] = {}  # key -> when it last appeared (absent: since the start)
        self.held: dict[tuple[str, str], str] = {}  # (key, code) -> signature, for conditions that persist
        self.degraded: set[str] = set()  # keys running below their best speed on this port
        self.last_camera: str | None = None

    # ------------------------------------------------------------------ helpers
    def _remember(self, dev: dict[str, Any]) -> None:
        self.last_known[dev["key"]] = dev
        self.by_port[dev["port"]] = dev["key"]
        if dev.get("kind") == "camera":
            self.last_camera = dev["key"]

    def _context(self, key: str, usage: Usage | None = None) -> dict[str, Any]:
        u = usage or self.usage.get(key) or Usage()
        return {"in_use": u.in_use, "users": list(u.users), "meeting": self.meeting}

    def _device_for(self, sig: Signal) -> dict[str, Any] | None:
        if sig.port is not None:
            key = self.by_port.get(sig.port)
        elif sig.code.startswith("video."):
            cams = [k for k, d in self.current.items() if d.get("kind") == "camera"]
            key = cams[0] if len(cams) == 1 else self.last_camera
        else:
            key = None
        return self.last_known.get(key) if key else None

    # ------------------------------------------------------------------ the diff
    def start(self, devices: list[dict[str, Any]], usage: dict[str, Usage] | None = None) -> None:
        """The first snapshot: reported as inventory, not as attaches."""
        self.current = {d["key"]: d for d in devices}
        for d in devices:
            self._remember(d)
            self.best_speed[(d["key"], d["port"])] = SPEED_RANK.get(d.get("speed", "unknown"), -1)
        self.usage = dict(usage or {})

    def step(self, tick: Tick) -> tuple[list[dict[str, Any]], bool]:
        """Events for this tick, and whether the inventory changed."""
        events: list[dict[str, Any]] = []
        prev = self.current
        cur = {d["key"]: d for d in tick.devices}
        for d in tick.devices:
            self.by_port[d["port"]] = d["key"]
        events += self._signal_errors(tick)
        events += self._held_conditions(tick, cur)

        inventory_changed = False
        for key, old in prev.items():
            new = cur.get(key)
            if new is None or new["port"] != old["port"]:
                usage = tick.usage.get(key) if new is None else None
                merged = Usage(
                    in_use=bool((usage and usage.in_use) or self.usage.get(key, Usage()).in_use),
                    users=sorted(set((usage.users if usage else []) + self.usage.get(key, Usage()).users)),
                )
                events.append(_event("device.detached", old, self._context(key, merged)))
                inventory_changed = True
        for key, new in cur.items():
            was = prev.get(key)
            if was is None or new["port"] != was["port"]:
                events.append(_event("device.attached", new, self._context(key, tick.usage.get(key))))
                inventory_changed = True
                self.present_since[key] = tick.now
            elif new.get("speed") != was.get("speed"):
                inventory_changed = True
            self._remember(new)
        events += self._speed(cur)
        self.meeting = tick.meeting
        for key, new in cur.items():
            u = tick.usage.get(key, Usage())
            before = self.usage.get(key, Usage())
            if key in prev and prev[key]["port"] == new["port"] and u.in_use != before.in_use:
                events.append(_event("device.usage", new, {"in_use": u.in_use, "users": list(u.users),
                                                           "meeting": tick.meeting}))
            self.usage[key] = u
        for key in list(self.usage):
            if key not in cur:
                self.usage.pop(key)
        for key in [k for k in self.present_since if k not in cur]:
            del self.present_since[key]
        self.current = cur
        events += self._quiet_recoveries(tick.now)
        for ev in events:
            if ev["type"] == "device.error":
                if ev["error"]["code"] == "usb.reset":
                    self.resets_total[ev["device"]["key"]] += ev["error"]["count"]
                else:
                    self.errors_total[ev["device"]["key"]] += ev["error"]["count"]
        return events, inventory_changed

    def _signal_errors(self, tick: Tick) -> list[dict[str, Any]]:
        grouped: dict[tuple[str, str], list[Signal]] = {}
        for sig in tick.signals:
            if sig.code in ("usb.disconnect", "usb.new_device"):
                continue
            dev = self._device_for(sig)
            if dev is None:
                continue
            grouped.setdefault((dev["key"], sig.code), []).append(sig)
        out = []
        for (key, code), sigs in grouped.items():
            first = sigs[0]
            out.append(_event("device.error", self.last_known[key], self._context(key),
                              _error(code, "kernel", first.message, first.errno, len(sigs))))
            if code != "usb.reset":
                self.active[(key, code)] = tick.now
        return out

    def _held_conditions(self, tick: Tick, cur: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Errors that persist while a condition holds (probe timeouts, self-reported faults)."""
        now_held: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        for key, dev in cur.items():
            errno = tick.probe_failures.get(dev["port"])
            if errno == -110:
                now_held[(key, "usb.timeout")] = ("timeout", _error(
                    "usb.timeout", "probe", f"{key}: no answer to a descriptor request (-110)", -110))
            for e in tick.device_errors.get(key, []):
                code = e["code"]
                now_held[(key, code)] = (repr(sorted(e.items())), _error(
                    code, e.get("source", "device"), e.get("message") or code, e.get("errno"),
                    problem_code=e.get("problem_code")))
        out = []
        for ident, (sig, err) in now_held.items():
            if self.held.get(ident) != sig:
                out.append(_event("device.error", cur[ident[0]], self._context(ident[0]), err))
                self.held[ident] = sig
        for ident in [i for i in self.held if i not in now_held]:
            del self.held[ident]
            key, code = ident
            if key in cur:
                out.append(_event("device.recovered", cur[key], {}, {"code": code}))
        return out

    def _speed(self, cur: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for key, dev in cur.items():
            rank = SPEED_RANK.get(dev.get("speed", "unknown"), -1)
            if rank < 0:
                continue
            slot = (key, dev["port"])
            best = self.best_speed.get(slot, -1)
            if rank < best:
                if key not in self.degraded:
                    self.degraded.add(key)
                    names = {v: k for k, v in SPEED_RANK.items()}
                    out.append(_event("device.error", dev, self._context(key), _error(
                        "usb.speed_degraded", "probe",
                        f"{key} on {dev['port']}: {dev.get('speed')} speed, reached {names[best]} here before")))
            else:
                self.best_speed[slot] = max(best, rank)
                if key in self.degraded:
                    self.degraded.discard(key)
                    out.append(_event("device.recovered", dev, {}, {"code": "usb.speed_degraded"}))
        return out

    def _quiet_recoveries(self, now: float) -> list[dict[str, Any]]:
        """``device.recovered`` for a kernel error once its device has been present ``recover_quiet_s``
        without that code: counted from the later of the last such error and the device's return."""
        out = []
        for (key, code), last in list(self.active.items()):
            since = max(last, self.present_since.get(key, last))
            if key in self.current and now - since >= self.recover_quiet_s:
                del self.active[(key, code)]
                out.append(_event("device.recovered", self.current[key], {}, {"code": code}))
        return out

    def telemetry_devices(self) -> list[dict[str, Any]]:
        out = []
        for key, dev in self.last_known.items():
            present = key in self.current
            out.append({
                "key": key, "present": present,
                "in_use": self.usage.get(key, Usage()).in_use if present else False,
                "speed": dev.get("speed", "unknown") if present else "unknown",
                "errors_total": self.errors_total[key], "resets_total": self.resets_total[key],
            })
        return out
