"""Host sleep detection: CLOCK_BOOTTIME runs on through suspend, CLOCK_MONOTONIC does not.

Between two ticks, if boottime advanced more than monotonic by at least ``threshold_s``,
the host slept in between. Works without D-Bus or logind; on platforms without
CLOCK_BOOTTIME it never fires.
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
