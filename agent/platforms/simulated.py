"""The simulated bus (docs/simulated-bus.md): devices, usage, meeting, reported errors and the
self-test's outcome all come from the bus file; usage of an entry with ``nodes`` comes from the
processes really holding those files, as on a real PC."""

from __future__ import annotations

import os
import zlib
from functools import partial
from typing import Any

from agent.platforms.base import Look, Platform, carry_nodes, usage_from_holders
from agent.probe.simulated import BusFile, SimulatedBackend
from agent.probe.usb import Prober
from agent.selftest.run import SelfTest
from agent.selftest.synthetic import SyntheticAudio, SyntheticVideo
from agent.watch import Usage

DEFAULT_TESTS = {"camera": {"video": "live"}, "speakerphone": {"audio": "live"}, "microphone": {"audio": "live"}}


class SimulatedPlatform(Platform):
    name = "simulated"

    def prober(self) -> Prober:
        assert self.cfg.simulated_bus
        self.bus = BusFile(self.cfg.simulated_bus)
        # never fall back to this machine's real sysfs for a simulated device's strings
        return Prober(SimulatedBackend(self.bus), sysfs_root=os.devnull)

    def _entries(self) -> dict[str, dict[str, Any]]:
        return {d["port"]: d for d in self.bus.devices}

    def look(self, devices: list[dict[str, Any]], prev_nodes: dict[str, list[str]]) -> Look:
        entries = self._entries()
        look = Look()
        for d in devices:
            e = entries.get(d["port"], {})
            look.nodes[d["key"]] = [str(n) for n in e.get("nodes") or []]
        look.usage = usage_from_holders(carry_nodes(look.nodes, prev_nodes))
        for d in devices:
            entry = entries.get(d["port"])
            if entry is None:
                continue
            e = entry
            if not e.get("nodes"):
                look.usage[d["key"]] = Usage(bool(e.get("in_use")), list(e.get("users") or []))
            look.meeting = look.meeting or bool(e.get("meeting"))
            if e.get("errors"):
                look.device_errors[d["key"]] = list(e["errors"])
        return look

    def self_tests(self, dev: dict[str, Any], nodes: list[str]) -> list[SelfTest]:
        e = self._entries().get(dev["port"], {})
        modes = {**DEFAULT_TESTS.get(str(dev.get("kind")), {}), **(e.get("self_test") or {})}
        node = nodes[0] if nodes else None
        seed = zlib.crc32(dev["key"].encode())
        tests = []
        if modes.get("video"):
            tests.append(SelfTest("video", node or "simulated", partial(SyntheticVideo, modes["video"], node, seed),
                                  nodes))
        if modes.get("audio"):
            tests.append(SelfTest("audio", node or "simulated", partial(SyntheticAudio, modes["audio"], node, seed),
                                  nodes))
        return tests
