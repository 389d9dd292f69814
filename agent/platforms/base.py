"""The interface every platform implements (see __init__.py for how one is chosen)."""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.probe.usb import Prober
from agent.selftest.run import SelfTest
from agent.usage import holders
from agent.watch import Usage


@dataclass
class Look:
    """What a platform sees of the devices the probe found, besides the devices themselves."""

    nodes: dict[str, list[str]] = field(default_factory=dict)  # key -> device nodes (files) of the device
    usage: dict[str, Usage] = field(default_factory=dict)
    meeting: bool = False
    device_errors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> errors it reports


class Platform(ABC):
    name = "abstract"

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def prober(self) -> Prober:
        """The USB prober for this platform."""

    @abstractmethod
    def look(self, devices: list[dict[str, Any]], prev_nodes: dict[str, list[str]]) -> Look:
        """Nodes, usage, meeting and reported errors for ``devices``; ``prev_nodes`` are the nodes
        of the previous look, whose holders matter too (after an unplug a held link reads
        ``... (deleted)``)."""

    def self_tests(self, dev: dict[str, Any], nodes: list[str]) -> list[SelfTest]:
        """The idle self-tests this platform can run on ``dev`` (none by default)."""
        return []

    def start_monitor(self, wake: threading.Event) -> None:
        """Set ``wake`` whenever a USB device comes or goes, where the platform can tell; a platform
        that cannot is polled (``poll_s``)."""
        return None


def usage_from_holders(nodes: dict[str, list[str]]) -> dict[str, Usage]:
    """Usage by the processes holding each device's nodes open; the agent's own process (which
    holds a node only while it self-tests the device) is not a user."""
    wanted = {n for ns in nodes.values() for n in ns}
    held = holders(wanted, exclude_pids={os.getpid()}) if wanted else {}
    usage = {}
    for key, ns in nodes.items():
        users = sorted({u for n in ns for u in held.get(n, []) + held.get(os.path.realpath(n), [])})
        usage[key] = Usage(bool(users), users)
    return usage


def carry_nodes(nodes: dict[str, list[str]], prev: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each device's nodes now; a device still present whose nodes are gone already (the kernel removes
    the video node before the USB device) keeps its previous ones, so a process still holding them — the
    "(deleted)" links — keeps counting as a user until the detach is seen. Unplugged devices keep theirs."""
    out = dict(prev)
    for key, ns in nodes.items():
        out[key] = ns or prev.get(key, [])
    return out
