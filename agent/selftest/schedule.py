"""When a device is self-tested, and what the results become on the wire.

A device is due after each attach (once ``self_test_settle_s`` has passed; devices present
when the agent starts count as attached then) and every night at ``self_test_daily_at`` (local
time). A due test starts only while the device is idle — no process holds any of its nodes and
no meeting runs — and never sooner than ``self_test_min_interval_s`` after the device's last
test; a test that had to let go is due again ``self_test_retry_s`` later. One test runs at a
time, on a worker thread, so the agent keeps watching the bus meanwhile.

Every finished test (pass or fail) becomes a ``device.self_test`` event with its figures; a
failure also becomes a ``device.error`` (source ``probe``) the first time it is seen, and a later
pass of the same test a ``device.recovered``.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.platforms.base import Platform
from agent.selftest.run import Result, SelfTest, Settings, run
from agent.watch import Tick
from common.protocol import truncate_message

log = logging.getLogger(__name__)


def next_daily(at: str, now: dt.datetime) -> dt.datetime:
    """The next local time ``HH:MM`` strictly after ``now``."""
    hh, mm = (int(x) for x in at.split(":"))
    t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    return t if t > now else t + dt.timedelta(days=1)


class SelfTestScheduler:
    def __init__(self, platform: Platform, settle_s: float, min_interval_s: float, retry_s: float,
                 daily_at: str | None, settings: Settings, wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        self.platform, self.settings, self.wake = platform, settings, wake
        self.settle_s, self.min_interval_s, self.retry_s = settle_s, min_interval_s, retry_s
        self.daily_at, self.clock, self.wall = daily_at, clock, wall
        self.due: dict[str, tuple[float, str]] = {}  # key -> (monotonic time due, trigger)
        self.last_run: dict[str, float] = {}
        self.failing: dict[tuple[str, str], str] = {}  # (key, test kind) -> error code standing
        self.next_night = next_daily(daily_at, wall()) if daily_at else None
        self.done: queue.Queue[tuple[dict[str, Any], str, list[Result]]] = queue.Queue()
        self.worker: threading.Thread | None = None
        self.cpu_s = 0.0  # thread CPU time all tests took so far

    def attached(self, keys: list[str]) -> None:
        now = self.clock()
        for k in keys:
            self.due[k] = (now + self.settle_s, "attach")

    def tick(self, tick: Tick, nodes: dict[str, list[str]]) -> None:
        """Called once per observation: note attaches and the night, start one due test if idle."""
        now = self.clock()
        present = {d["key"]: d for d in tick.devices}
        for k in [k for k in self.due if k not in present]:
            del self.due[k]
        if self.next_night is not None and self.wall() >= self.next_night:
            self.next_night = next_daily(self.daily_at or "03:00", self.wall())
            for k in present:
                self.due.setdefault(k, (now, "nightly"))
        if self.worker is not None and self.worker.is_alive():
            return
        for key, (when, trigger) in sorted(self.due.items(), key=lambda kv: kv[1][0]):
            if when > now:
                continue
            last = self.last_run.get(key)
            if last is not None and now - last < self.min_interval_s:
                self.due[key] = (last + self.min_interval_s, trigger)  # deferred, never dropped
                continue
            usage = tick.usage.get(key)
            if tick.meeting or (usage is not None and usage.in_use):
                continue  # due still; tried at the next idle look
            tests = self.platform.self_tests(present[key], nodes.get(key, []))
            del self.due[key]
            if not tests:
                continue
            self.last_run[key] = now
            self.worker = threading.Thread(target=self._work, args=(present[key], trigger, tests),
                                           name="pantau-selftest", daemon=True)
            self.worker.start()
            return

    def _work(self, dev: dict[str, Any], trigger: str, tests: list[SelfTest]) -> None:
        results = []
        for t in tests:
            try:
                r = run(t, self.settings)
            except Exception as exc:  # never let a test take the agent down
                log.exception("self-test %s of %s failed unexpectedly", t.kind, dev["key"])
                r = Result(t.kind, t.node, "skipped", message=f"{type(exc).__name__}: {exc}")
            results.append(r)
            if r.outcome == "busy":
                break  # someone wants the device: leave it alone altogether
        self.done.put((dev, trigger, results))
        if self.wake is not None:
            self.wake.set()

    def events(self) -> list[dict[str, Any]]:
        """Protocol events of the tests finished since the last call."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                dev, trigger, results = self.done.get_nowait()
            except queue.Empty:
                return out
            for r in results:
                self.cpu_s += r.cpu_s
                log.info("self-test %s of %s on %s: %s in %.2f s, cpu %.3f s, %d guard checks: %s", r.test,
                         dev["key"], r.node, r.outcome, r.duration_s, r.cpu_s, r.guard_checks, r.message)
                if r.outcome == "busy":
                    self.due[dev["key"]] = (self.clock() + self.retry_s, "retry")
                    continue
                if r.outcome == "skipped":
                    continue
                out += self._result_events(dev, trigger, r)

    def _result_events(self, dev: dict[str, Any], trigger: str, r: Result) -> list[dict[str, Any]]:
        ctx = {"test": r.test, "result": r.outcome, "trigger": trigger, "node": r.node, "code": r.code,
               "duration_s": r.duration_s, "figures": r.figures}
        out: list[dict[str, Any]] = [{"type": "device.self_test", "device": dev, "context": ctx}]
        slot = (dev["key"], r.test)
        standing = self.failing.get(slot)
        if standing is not None and standing != r.code:
            del self.failing[slot]
            out.append({"type": "device.recovered", "device": dev, "context": {}, "error": {"code": standing}})
        if r.code is not None and standing != r.code:
            self.failing[slot] = r.code
            idle = {"in_use": False, "users": [], "meeting": False, "self_test": r.test}
            out.append({"type": "device.error", "device": dev, "context": idle,
                        "error": {"code": r.code, "source": "probe", "errno": r.errno, "problem_code": None,
                                  "message": truncate_message(f"{r.node}: {r.message}"), "count": 1}})
        return out
