"""The running collector: store, ingest, classification, notifications and web, started and stopped together."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any


def settle_heap() -> None:
    """Leave what start-up built out of the cyclic garbage collector's full collections.

    A full collection walks every tracked object; over a started collector's heap (the web framework,
    the modules, the classifier's state: ~80,000 objects) that paused the ingesting thread 30-45 ms on an
    idle 2-core machine and over 100 ms on a busy one. Frozen, start-up objects are never walked again;
    a full collection then walks only what the running collector made since.
    """
    gc.collect()
    gc.freeze()


class Service:
    """Collector + subscriber + web, started and stopped together."""

    def __init__(self, cfg: Any) -> None:
        from collector.ingest import Collector
        from collector.registry import load_toml
        from collector.store import is_postgres, open_store
        from collector.subscriber import Subscriber
        from collector.web.server import WebServer
        from collector.web.settings import WebSettings
        from common.config import parse_broker

        if not is_postgres(cfg.db):
            os.makedirs(os.path.dirname(os.path.abspath(cfg.db)), exist_ok=True)
        self.store = open_store(cfg.db)
        if cfg.registry:
            load_toml(self.store, cfg.registry)
        ts = None
        if cfg.influx_url:
            from collector.store.influx import InfluxSink

            ts = InfluxSink(cfg.influx_url, cfg.influx_token or "", cfg.influx_org or "", cfg.influx_bucket,
                            cfg.influx_buffer)
        # several collectors may share a PostgreSQL database: each ingests its share of the stream, and
        # the one holding the lead classifies what all of them stored (``_lead``)
        self.shared = getattr(self.store, "dialect", "sqlite") == "postgresql"
        self.collector = Collector(self.store, cfg.windows, cfg.prefix, lang=cfg.lang, timeseries=ts,
                                   classify_every_s=1.0, classify=not self.shared)
        self.notifier = None
        if cfg.smtp_host or cfg.webhook_url:
            from collector.notify import Notifier, NotifyConfig

            self.notifier = Notifier(self.store, NotifyConfig(
                smtp_host=cfg.smtp_host, smtp_port=int(cfg.smtp_port), smtp_from=cfg.smtp_from,
                central_it=[a.strip() for a in (cfg.central_it_email or "").split(",") if a.strip()],
                webhook_url=cfg.webhook_url, delay_s=float(cfg.notify_delay_s),
                dashboard_url=cfg.dashboard_url or ""))
            self.collector.book.listeners.append(self.notifier.on_incident)
            self.notifier.may_deliver = lambda: self.leading
        self.fleet_watch = None
        if self.notifier is not None and cfg.notify_fleet:  # offline too long, clocks off
            from collector.fleet_notify import FleetWatch
            from collector.web.settings import fleet_settings

            self.fleet_watch = FleetWatch(self.store, self.notifier, fleet_settings(cfg))
        self.cfg = cfg
        # receiving: receiver processes feeding this process's single writer, or this process alone
        self.ingest: Any
        if int(cfg.receivers) > 0:
            from collector.writer import Writer

            self.ingest = Writer(self.collector, cfg, int(cfg.receivers))
        else:
            self.ingest = Subscriber(self.collector, parse_broker(cfg.broker), cfg.client_id, cfg.prefix,
                                     cfg.share_group, cfg.username, cfg.password, cfg.ca_file,
                                     mqtt_version=cfg.mqtt_version)
        host, port = cfg.http_host_port
        from collector import enroll

        enroll.configure(enroll.EnrollSettings.from_config(cfg))  # enrollment routes and broker accounts
        tls = (cfg.tls_cert_file, cfg.tls_key_file) if cfg.tls_cert_file else None
        self.web = WebServer(self.collector, host, port, health=self.health, settings=WebSettings.from_config(cfg),
                             tls=tls)
        self._stop = threading.Event()

    def start(self) -> None:
        if self.notifier is not None:
            self.notifier.start()
        self.web.start()
        if self.shared:
            self._lead_once()  # the first collector classifies from its start
            threading.Thread(target=self._lead, daemon=True).start()
        self.ingest.start()
        threading.Thread(target=self._maintain, daemon=True).start()
        settle_heap()

    config_path: str | None = None
    TIMESERIES_BUFFER_MAX = 100_000  # points waiting for InfluxDB before the collector says it is unhealthy

    def health(self) -> list[str]:
        """Why the collector is not doing its job now, in words; empty when healthy (``/healthz``)."""
        reasons: list[str] = list(self.ingest.health())
        if not any("storing the last batch failed" in r for r in reasons):
            reasons += self.collector.health()
        ts = self.collector.timeseries
        if ts is not None and ts.buffer_depth() > self.TIMESERIES_BUFFER_MAX:
            reasons.append(f"{ts.buffer_depth()} time-series points wait for InfluxDB "
                           f"(more than {self.TIMESERIES_BUFFER_MAX})")
        return reasons

    LEAD_EVERY_S = 1.0

    @property
    def leading(self) -> bool:
        """This collector classifies (always, on SQLite; on PostgreSQL, the one holding the lead)."""
        return not self.shared or self.collector.classifier is not None

    def _lead_once(self) -> None:
        if self.store.try_lead():
            if self.collector.classifier is None:
                logging.getLogger(__name__).info("this collector classifies (it holds the lead)")
                self.collector.start_classifying()
            self.collector.follow()
        elif self.collector.classifier is not None:
            logging.getLogger(__name__).warning("this collector lost the lead: another one classifies now")
            self.collector.stop_classifying()

    def _lead(self) -> None:
        """Take the lead when no collector holds it (within ``LEAD_EVERY_S`` of its holder's end), and
        classify what every collector stored while holding it."""
        while not self._stop.wait(self.LEAD_EVERY_S if self.collector.classifier is None else 0.5):
            try:
                self._lead_once()
            except Exception:
                logging.getLogger(__name__).exception("leading failed; tried again")

    def _maintain(self) -> None:
        from collector import leases

        while not self._stop.wait(10):
            try:
                self.store.roll_up_and_expire(time.time())
                if self.collector.timeseries is not None:
                    self.collector.timeseries.retry_buffer()
                if self.leading:  # pruning, loans and fleet notices: the classifying collector's
                    self.collector.tick()
                    leases.sweep(self.store)  # loan-out and return snapshots that are due; lease-ended accounts
            except Exception:
                logging.getLogger(__name__).exception("maintenance failed")
            try:
                if self.fleet_watch is not None and self.leading:
                    self.fleet_watch.check()
            except Exception:
                logging.getLogger(__name__).exception("fleet notifications failed")

    def stop(self) -> None:
        self._stop.set()
        if self.notifier is not None:
            self.notifier.stop()
        self.ingest.stop()
        self.web.stop()
        if self.collector.timeseries is not None:
            self.collector.timeseries.close()
        self.store.close()
