"""``/metrics`` for Prometheus, written by prometheus_client from the collector's counters on each scrape."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from collector.web.views import WebState

log = logging.getLogger(__name__)


def health_reasons(st: WebState) -> list[str]:
    if st.health is None:
        return []
    try:
        reasons = st.health()
    except Exception as exc:  # a failing check is itself a reason
        log.exception("health check failed")
        return [f"health check failed: {type(exc).__name__}"]
    return [str(r) for r in reasons]


def _finite(v: Any) -> float:
    f = float(v)
    return f if math.isfinite(f) else 0.0


class PantauMetrics:
    def __init__(self, st: WebState) -> None:
        self.st = st

    def collect(self) -> Iterator[Metric]:
        m = self.st.collector.metrics()
        for name, doc, key in (
            ("pantau_messages_received", "Messages received from the broker.", "received"),
            ("pantau_messages_stored", "Valid messages committed to the store (duplicates excluded).", "stored"),
            ("pantau_messages_duplicate", "Duplicates (agent, boot, seq) applied once.", "duplicates"),
        ):
            yield CounterMetricFamily(name, doc, value=_finite(m[key]))
        rejected = CounterMetricFamily("pantau_messages_rejected", "Messages rejected by validation, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(m["rejected"].items()):
            rejected.add_metric([str(reason)], _finite(n))
        yield rejected
        yield GaugeMetricFamily("pantau_ingest_lag_seconds", "Receive time minus the agent's ts, last message.",
                                value=_finite(m["lag_s"]))
        yield GaugeMetricFamily("pantau_store_buffer_depth", "Time-series points waiting for the external store.",
                                value=_finite(m["buffer_depth"]))
        yield GaugeMetricFamily("pantau_dead_letters", "Rejected messages kept for inspection.",
                                value=_finite(m["dead_letters"]))
        offsets = GaugeMetricFamily("pantau_agent_clock_offset_seconds",
                                    "Each room PC's clock minus the collector's, as last measured.", labels=["agent"])
        for row in self.st.reader.query("SELECT agent, clock_offset_s FROM agents WHERE clock_offset_s IS NOT NULL "
                                        "ORDER BY agent"):
            v = row["clock_offset_s"]
            if isinstance(v, int | float) and math.isfinite(v):
                offsets.add_metric([row["agent"]], float(v))
        yield offsets
        yield GaugeMetricFamily("pantau_healthy", "1 when /healthz answers ok, else 0.",
                                value=0.0 if health_reasons(self.st) else 1.0)


def metrics_text(st: WebState) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PantauMetrics(st))
    return generate_latest(reg)
