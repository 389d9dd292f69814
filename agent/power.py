"""Host sleep: logind's PrepareForSleep where there is one, and in any case a detector.

The detector: CLOCK_BOOTTIME runs on through suspend, CLOCK_MONOTONIC does not.

Between two ticks, if boottime advanced more than monotonic by at least ``threshold_s``,
the host slept in between. Works without D-Bus or logind; on platforms without
CLOCK_BOOTTIME it never fires.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator


def _boottime() -> float | None:
    clk = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clk) if clk is not None else None


class SuspendDetector:
    def __init__(
        self,
        threshold_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        boottime: Callable[[], float | None] = _boottime,
    ) -> None:
        self.threshold_s = threshold_s
        self._mono = monotonic
        self._boot = boottime
        self._last: tuple[float, float] | None = None

    def tick(self) -> float | None:
        """Seconds slept since the previous tick, or None if the host did not sleep."""
        b = self._boot()
        m = self._mono()
        if b is None:
            return None
        last, self._last = self._last, (m, b)
        if last is None:
            return None
        slept = (b - last[1]) - (m - last[0])
        return slept if slept >= self.threshold_s else None


DBUS_MATCH = "type='signal',interface='org.freedesktop.login1.Manager',member='PrepareForSleep'"


def parse_prepare_for_sleep(lines: Iterable[str]) -> Iterator[bool]:
    """``dbus-monitor`` output -> True when the host is about to sleep, False when it woke."""
    pending = False
    for line in lines:
        if "member=PrepareForSleep" in line:
            pending = True
        elif pending and line.strip().startswith("boolean "):
            pending = False
            yield line.strip().split()[1] == "true"


class LogindSleepWatcher:
    """Follows logind's PrepareForSleep through ``dbus-monitor --system``: unlike the clock
    detector it speaks *before* the host sleeps, so devices vanishing on the way down are
    already inside host.suspending. Silently absent where there is no D-Bus or dbus-monitor."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self.on_change = on_change
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> bool:
        exe = shutil.which("dbus-monitor")
        if exe is None or not os.path.exists("/run/dbus/system_bus_socket"):
            return False
        try:
            self.proc = subprocess.Popen([exe, "--system", DBUS_MATCH], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return False
        threading.Thread(target=self._run, name="pantau-logind", daemon=True).start()
        return True

    def _run(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for asleep in parse_prepare_for_sleep(self.proc.stdout):
            self.on_change(asleep)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
