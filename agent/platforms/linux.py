"""Linux: libusb for the bus, sysfs for device nodes, /proc for who holds them, V4L2 and ALSA
for the idle self-test."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from agent.platforms.base import Look, Platform, carry_nodes, usage_from_holders
from agent.probe.usb import Prober, libusb_backend
from agent.selftest.run import SelfTest
from agent.usage import device_nodes, meeting_running


class LinuxPlatform(Platform):
    name = "linux"

    def prober(self) -> Prober:
        return Prober(libusb_backend(), self.cfg.sysfs_root)

    def look(self, devices: list[dict[str, Any]], prev_nodes: dict[str, list[str]]) -> Look:
        found = {d["key"]: device_nodes(d["port"], self.cfg.sysfs_root) for d in devices}
        nodes = {k: v for k, v in carry_nodes(found, prev_nodes).items() if k in found}
        usage = usage_from_holders(carry_nodes(found, prev_nodes))
        return Look(nodes=nodes, usage=usage, meeting=meeting_running(self.cfg.meeting_processes))

    def self_tests(self, dev: dict[str, Any], nodes: list[str]) -> list[SelfTest]:
        from agent.selftest.alsa import AlsaCapture
        from agent.selftest.v4l2 import V4l2Capture

        tests: list[SelfTest] = []
        videos = [n for n in nodes if n.rsplit("/", 1)[-1].startswith("video")]
        if dev.get("kind") == "camera" and videos:
            # a UVC camera has a metadata node beside its video node: the capture tries each in turn
            tests.append(SelfTest("video", videos[0], partial(V4l2Capture, videos), nodes))
        for n in nodes:
            if n.rsplit("/", 1)[-1].startswith("pcmC") and n.endswith("c"):
                tests.append(SelfTest("audio", n, partial(AlsaCapture, n), nodes))
                break
        return tests

    def start_monitor(self, wake: threading.Event) -> None:
        from agent.probe.udev import start_usb_monitor

        start_usb_monitor(wake)
