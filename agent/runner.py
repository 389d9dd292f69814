"""The agent loop: probe, watch, spool, publish. Observes and reports; never judges."""

from __future__ import annotations

import logging
import os
import platform
import secrets
import socket
import threading
import time
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.handoff import Report, ensure_dir, pending_reports, remove
from agent.host import gauges, host_boot_ts
from agent.platforms import Platform, choose
from agent.power import LogindSleepWatcher, SuspendDetector
from agent.publish import Session
from agent.selftest.run import Settings
from agent.selftest.schedule import SelfTestScheduler
from agent.signals.kmsg import parse_lines
from agent.signals.resolve import resolve
from agent.signals.tail import KernelLogTail
from agent.spool import Outbox
from agent.state import AgentLock, record_boot
from agent.watch import Tick, Usage, Watcher
from common.protocol import encode, envelope, topic_for

log = logging.getLogger(__name__)


class Observer:
    """One look at the room: devices, who uses them, meeting, self-reported errors. What differs
    between platforms is the platform's (agent/platforms), chosen once here."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.platform = choose(cfg)
        self.prober = self.platform.prober()
        self.nodes: dict[str, list[str]] = {}

    def look(self) -> Tick:
        devices = [d for d in self.prober.probe() if self.cfg.watches(d)]
        # the previous nodes count too: after an unplug the links read "... (deleted)"
        seen = self.platform.look(devices, self.nodes)
        self.nodes = seen.nodes
        return Tick(devices=devices, usage=seen.usage, meeting=seen.meeting,
                    probe_failures=dict(self.prober.failures), device_errors=seen.device_errors,
                    now=time.monotonic())


def make_scheduler(cfg: AgentConfig, platform: Platform, wake: threading.Event) -> SelfTestScheduler | None:
    if not cfg.self_test:
        return None
    return SelfTestScheduler(
        platform, cfg.self_test_settle_s, cfg.self_test_min_interval_s, cfg.self_test_retry_s,
        None if cfg.self_test_daily_at == "off" else cfg.self_test_daily_at,
        Settings(frames=cfg.self_test_frames, first_frame_s=cfg.self_test_first_frame_s,
                 audio_s=cfg.self_test_audio_s), wake)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.boot = secrets.token_hex(8)
        self._seq = 0
        self._seq_lock = threading.Lock()
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.lock = AgentLock(cfg.state_dir)
        self.lock.acquire()  # AlreadyRunning: one agent per state directory
        try:
            self.outbox = Outbox(os.path.join(cfg.state_dir, "outbox.sqlite"), cfg.spool_max_events,
                                 cfg.spool_max_bytes, mem_max_events=cfg.spool_memory_max_events)
        except BaseException:
            self.lock.release()
            raise
        self.prev_boot = record_boot(cfg.state_dir, self.boot)
        self.observer = Observer(cfg)
        self.watcher = Watcher(cfg.recover_quiet_s)
        self.kernel = KernelLogTail(cfg.kernel_log) if cfg.kernel_log else None
        self.suspend = SuspendDetector(threshold_s=max(5.0, cfg.poll_s * 2))
        self.session = Session(cfg, self.boot, self.outbox, self._on_connected)
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # set by the udev monitor on a USB add/remove
        self._logind_cycle = False  # logind announced a sleep since the last tick
        # Inventory changes while offline wait for the reconnect's fresh inventory instead of being
        # spooled: a superseded unsent one would leave a seq gap.
        self._inventory_dirty = False
        self.logind = LogindSleepWatcher(self._on_logind)
        self.selftest = make_scheduler(cfg, self.observer.platform, self.wake)

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def _topic(self, channel: str) -> str:
        return topic_for(self.cfg.agent_id, channel, self.cfg.prefix)

    def _spool(self, channel: str, kind: str, retain: bool = False, keep: bool = False, token: str | None = None,
               **body: Any) -> None:
        with self._seq_lock:  # seq order == outbox order
            self._seq += 1
            msg = envelope(self.cfg.agent_id, self.boot, self._seq, kind, **body)
            self.outbox.put(self._topic(channel), encode(msg), qos=1, retain=retain, keep=keep, token=token)

    def emit(self, ev: dict[str, Any], token: str | None = None) -> None:
        body = dict(ev)
        etype = body.pop("type")
        # a detach is what a liability decision turns on: never the one dropped from a full memory
        self._spool("events", "event", keep=etype == "device.detached", token=token, type=etype, **body)
        log.info("event %s %s", etype, (ev.get("device") or {}).get("key", ""))

    def take_reports(self) -> None:
        """Send the handling reports queued by ``pantau-agent report-handling`` as our own events;
        a report's file goes once its event is safely in the outbox."""
        for rep in pending_reports(self.cfg.state_dir):
            state = self.outbox.token_state(rep.id)
            if state is None:
                self.emit({"type": "handling.reported", "device": self._report_device(rep),
                           "context": {"note": rep.note, "reported_by": rep.reported_by, "via": "agent",
                                       "reported_at": rep.reported_at}}, token=rep.id)
                state = self.outbox.token_state(rep.id)
            if state == "queued":
                remove(rep)
                self.outbox.forget_token(rep.id)

    def _report_device(self, rep: Report) -> dict[str, Any]:
        """The device as last seen; an unknown key (unplugged, never seen) goes as the key alone."""
        dev = self.watcher.current.get(rep.key) or self.watcher.last_known.get(rep.key)
        return dict(dev) if dev else {"key": rep.key}

    def _forget_stale_tokens(self) -> None:
        """Tokens of reports whose file is gone (a stop between queueing and cleaning up)."""
        waiting = {r.id for r in pending_reports(self.cfg.state_dir)}
        for token in self.outbox.tokens() - waiting:
            self.outbox.forget_token(token)

    def _inventory(self) -> None:
        self._spool("inventory", "inventory", retain=True, devices=list(self.watcher.current.values()))

    def _on_connected(self) -> None:
        self._spool("state", "state", retain=True, state="online", version=__version__,
                    platform=platform.system().lower(), hostname=socket.gethostname(), labels=self.cfg.labels,
                    interval_s=self.cfg.telemetry_s, spool_dropped=self.outbox.dropped_total)
        self._inventory()

    def telemetry(self) -> None:
        """QoS 0, not spooled; only while connected, so no seq is spent on a message nobody gets."""
        if not self.session.connected.is_set():
            return
        msg = envelope(self.cfg.agent_id, self.boot, self._next_seq(), "telemetry", host=gauges(),
                       devices=self.watcher.telemetry_devices(),
                       spool={"depth": self.outbox.depth, "dropped_total": self.outbox.dropped_total})
        self.session.publish_now(self._topic("telemetry"), encode(msg), qos=0)

    def _on_logind(self, asleep: bool) -> None:
        self.emit({"type": "host.suspending" if asleep else "host.resumed", "context": {"source": "logind"}})
        self._logind_cycle = True
        self.wake.set()

    def tick(self) -> None:
        slept = self.suspend.tick()
        if slept is not None and self._logind_cycle:
            slept = None  # logind already said it, before the devices went
        self._logind_cycle = False
        self.outbox.retry()
        self.take_reports()
        t = self.observer.look()
        if self.kernel is not None:
            t.signals = resolve(parse_lines(self.kernel.read()), self.cfg.sysfs_root)
        if slept is not None:
            self.emit({"type": "host.suspending", "context": {"slept_s": round(slept, 1)}})
        events, inv_changed = self.watcher.step(t)
        for ev in events:
            self.emit(ev)
        if self.selftest is not None:
            self.selftest.attached([ev["device"]["key"] for ev in events if ev["type"] == "device.attached"])
            self.selftest.tick(t, self.observer.nodes)
            for ev in self.selftest.events():
                if ev["type"] == "device.error":
                    self.watcher.errors_total[ev["device"]["key"]] += 1
                self.emit(ev)
        if slept is not None:
            self.emit({"type": "host.resumed", "context": {"slept_s": round(slept, 1)}})
        if inv_changed and self.session.connected.is_set():
            self._inventory()
        elif inv_changed:
            self._inventory_dirty = True

    def run(self) -> None:
        first = self.observer.look()
        self.watcher.start(first.devices, first.usage)
        if self.selftest is not None:  # a device present at start counts as just attached
            self.selftest.attached([d["key"] for d in first.devices])
        self.emit({"type": "agent.started", "context": {"host_boot": host_boot_ts(), "version": __version__,
                                                        "prev_boot": self.prev_boot}})
        self._forget_stale_tokens()
        try:
            ensure_dir(self.cfg.state_dir)
        except OSError as exc:
            log.warning("cannot create the handling reports directory: %s", exc)
        self.take_reports()  # reports queued while no agent ran go right after agent.started
        self.observer.platform.start_monitor(self.wake)
        if self.observer.platform.name != "simulated":
            self.logind.start()
        self.session.start()
        next_tel = time.monotonic() + 1.0
        was_connected = False
        while not self.stop_event.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("tick failed; going on")
            connected = self.session.connected.is_set()
            if connected and not was_connected:
                self._inventory_dirty = False  # _on_connected sent a fresh one
            elif connected and self._inventory_dirty:
                self._inventory()
                self._inventory_dirty = False
            was_connected = connected
            if time.monotonic() >= next_tel:
                self.telemetry()
                next_tel = time.monotonic() + self.cfg.telemetry_s
            if self.wake.wait(self.cfg.poll_s):
                self.wake.clear()
                time.sleep(0.3)  # let the kernel finish (interfaces, strings, drivers) before looking
            if self.stop_event.is_set():
                break
        self.shutdown()

    def shutdown(self, flush_s: float = 4.0) -> None:
        self.emit({"type": "agent.stopping", "context": {}})
        self._spool("state", "state", retain=True, state="offline", reason="shutdown")
        self.logind.stop()
        flushed = self.session.drain(flush_s)
        if not flushed:
            log.warning("stopping with %d messages still in the outbox; they go out at next start",
                        self.outbox.depth)
        self.session.stop()
        self.outbox.close()
        self.lock.release()


def snapshot(cfg: AgentConfig) -> dict[str, Any]:
    """What ``pantau-agent once`` prints."""
    t = Observer(cfg).look()
    gauges()  # the first cpu_percent() call primes the counter
    time.sleep(0.1)
    return {
        "agent": cfg.agent_id,
        "devices": [{**d, "in_use": t.usage.get(d["key"], Usage()).in_use,
                     "users": t.usage.get(d["key"], Usage()).users} for d in t.devices],
        "meeting": t.meeting,
        "host": gauges(),
    }
