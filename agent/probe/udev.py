"""Wake the agent the moment the kernel reports a USB device added or removed (Linux, pyudev).

Without udev (containers, Windows, no pyudev) this quietly does nothing and the agent
notices changes at its next poll instead.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def start_usb_monitor(wake: threading.Event) -> bool:
    """Set ``wake`` on every USB add/remove; True if a monitor is running."""
    try:
        import pyudev

        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source="kernel")
        monitor.filter_by("usb")
        monitor.start()
    except Exception as exc:  # no pyudev, no netlink, no permission: polling covers it
        log.info("no udev monitor (%s); changes are seen at the next poll", exc)
        return False

    def run() -> None:
        while True:
            try:
                dev = monitor.poll(timeout=None)
            except Exception as exc:
                log.warning("udev monitor stopped (%s); falling back to polling", exc)
                return
            if dev is not None and dev.action in ("add", "remove") and dev.device_type == "usb_device":
                wake.set()

    threading.Thread(target=run, name="pantau-udev", daemon=True).start()
    log.info("udev monitor running: USB changes are seen at once")
    return True
