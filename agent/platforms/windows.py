"""Windows: libusb for the bus, the ConsentStore for who uses cameras and microphones, device
problem codes from PnP. No idle self-test yet: it would need Media Foundation (an
IMFSourceReader on the camera's symbolic link) and WASAPI (an IAudioCaptureClient on the
endpoint), see docs/self-test.md."""

from __future__ import annotations

import logging
from typing import Any

from agent.platforms.base import Look, Platform
from agent.probe.usb import Prober, libusb_backend
from agent.usage import meeting_running
from agent.watch import Usage

log = logging.getLogger(__name__)


class WindowsPlatform(Platform):  # pragma: no cover - Windows only
    name = "windows"

    def prober(self) -> Prober:
        return Prober(libusb_backend(), self.cfg.sysfs_root)

    def look(self, devices: list[dict[str, Any]], prev_nodes: dict[str, list[str]]) -> Look:
        import psutil

        from agent.signals.pnp import query_windows
        from agent.usage_windows import query, users_by_kind

        look = Look(nodes={d["key"]: [] for d in devices}, usage={d["key"]: Usage() for d in devices},
                    meeting=meeting_running(self.cfg.meeting_processes))
        try:
            names = [p.info["name"] or "" for p in psutil.process_iter(["name"])]
            by_kind = users_by_kind(query(), names)
            problems = [d for d in query_windows() if d.error is not None]
        except Exception as exc:
            log.warning("reading Windows usage or problem codes failed: %s", exc)
            return look
        for d in devices:
            users = by_kind.get(d["kind"], [])
            look.usage[d["key"]] = Usage(bool(users), users)
            for p in problems:
                if (p.vid, p.pid) == (d["vid"], d["pid"]) and (p.serial in (None, d.get("serial"))):
                    look.device_errors.setdefault(d["key"], []).append(dict(p.error or {}))
        return look
