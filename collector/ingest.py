"""The collector's pipeline in one process: the ingestor stores, the classifier decides.

``Collector`` wires an ``Ingestor`` (validate, dedup, store) to a ``Classifier`` (policy on each
agent's own clock): the classifier is fed committed evidence only (with several collectors on one
PostgreSQL, only the one holding the lead classifies, following what every collector stored).
Transport-free: the MQTT subscriber, replay-through-the-live-path tests and the benchmarks all call
``Collector.ingest``.
"""

from __future__ import annotations

from typing import Any

from collector.classifier import Classifier
from collector.incidents import IncidentBook
from collector.ingestor import Inbound, Ingestor, Stored
from collector.policy import Windows
from collector.store.sqlite import SqliteStore, StoreError

__all__ = ["Collector", "Inbound", "Stored"]


def _take_lead(store: Any) -> None:
    """A classifying collector holds the lead of its store (PostgreSQL; on SQLite it is the only one)."""
    try_lead = getattr(store, "try_lead", None)
    if try_lead is not None and not try_lead():
        raise StoreError("another collector classifies on this database: this one may only ingest "
                         "(as a collector sharing it does)")


class Collector:
    def __init__(self, store: SqliteStore, windows: Windows | None = None, prefix: str | None = None,
                 dead_letter_max: int = 1000, lang: str = "id", timeseries: Any = None,
                 classify_every_s: float = 0.0, classify: bool = True) -> None:
        self.store = store
        self.windows = windows
        self.lang = lang
        self.classify_every_s = classify_every_s
        self.ingestor = Ingestor(store, prefix, dead_letter_max, timeseries)
        # people's decisions (override, acknowledge) go through the book in every collector; the
        # classifier's changes through the same book, so its listeners (notifications) hear both
        self.book = IncidentBook(store, lang)
        # with several collectors on one PostgreSQL, only the one holding the lead classifies
        # (``start_classifying``), following the store
        self.classifier: Classifier | None = None
        if classify:
            _take_lead(store)
            self.classifier = Classifier(store, windows, lang, classify_every_s, self.book)
            self.ingestor.listeners.append(self.classifier.accept)

    def start_classifying(self) -> None:
        """Become the classifier, from what is stored (as at a restart); fed by ``follow``."""
        if self.classifier is None:
            _take_lead(self.store)
            self.classifier = Classifier(self.store, self.windows, self.lang, self.classify_every_s, self.book)

    def stop_classifying(self) -> None:
        self.classifier = None

    @property
    def timeseries(self) -> Any:
        return self.ingestor.timeseries

    def ingest(self, items: list[Inbound]) -> list[Stored]:
        return self.ingestor.ingest(items)

    @property
    def has_dirty(self) -> bool:
        return self.classifier is not None and self.classifier.has_dirty

    def classify_dirty(self) -> None:
        if self.classifier is not None:
            self.classifier.classify_dirty()

    def follow(self) -> None:
        if self.classifier is not None:
            self.classifier.follow()

    def tick(self) -> None:
        if self.classifier is not None:
            self.classifier.tick()

    def report_handling(self, agent: str, device_key: str, note: str, by: str) -> dict[str, Any]:
        out = self.ingestor.report_handling(agent, device_key, note, by)
        self.classify_dirty()
        return out

    def metrics(self) -> dict[str, Any]:
        return self.ingestor.metrics()

    def health(self) -> list[str]:
        return self.ingestor.health()
