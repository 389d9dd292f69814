"""An ingest worker: one member of an MQTT 5 shared subscription, validating, deduplicating and
storing its share of the stream. The main collector process classifies, by following what the
workers committed (``Classifier.follow``). Started by ``pantau-collector serve`` when
``ingest_workers`` > 1; each worker is its own process, so receiving and parsing use every core.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from collector.config import load
from collector.ingest import Collector
from collector.store import open_store
from collector.subscriber import Subscriber
from common.config import ConfigError, parse_broker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pantau-collector-worker")
    ap.add_argument("--config")
    ap.add_argument("--index", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker{args.index} %(name)s: %(message)s")
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"pantau-collector worker: {exc}", file=sys.stderr)
        return 2
    store = open_store(cfg.db)
    writer = Collector(store, cfg.windows, cfg.prefix, classify=False)
    # Each worker is its own broker account (<username>-w<index>, same password): the shipped broker ties
    # the client id to the account, so workers sharing one would take each other's connection.
    broker = parse_broker(cfg.broker)
    user = cfg.username or broker.username
    sub = Subscriber(writer, broker, f"{cfg.client_id}-w{args.index}", cfg.prefix, cfg.share_group or "pantau-ingest",
                     f"{user}-w{args.index}" if user else None, cfg.password or broker.password, cfg.ca_file,
                     mqtt_version="5")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sub.start()
    done.wait()
    sub.stop()  # finishes the batch in hand and acknowledges it
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
