"""Platform code as implementations: one per platform, chosen once at start-up.

``choose(cfg)`` picks the simulated bus when configured, else Windows or Linux by the OS the
agent runs on. Everything that differs between them (how devices are probed, who uses them,
device problem codes, the idle self-test) lives behind ``Platform`` (base.py), one file each:
linux.py, windows.py, simulated.py.
"""

from __future__ import annotations

import os

from agent.config import AgentConfig
from agent.platforms.base import Look, Platform


def choose(cfg: AgentConfig) -> Platform:
    if cfg.usb_backend == "simulated":
        from agent.platforms.simulated import SimulatedPlatform

        return SimulatedPlatform(cfg)
    if os.name == "nt":  # pragma: no cover - Windows only
        from agent.platforms.windows import WindowsPlatform

        return WindowsPlatform(cfg)
    from agent.platforms.linux import LinuxPlatform

    return LinuxPlatform(cfg)


__all__ = ["Look", "Platform", "choose"]
