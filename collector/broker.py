"""The embedded MQTT broker for the demo (amqtt), bound to 127.0.0.1 only.

amqtt's own default binds 0.0.0.0, so a config is always passed. It speaks MQTT 3.1.1
only and is several times slower than Mosquitto: use Mosquitto in production (deploy/).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedBroker:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker: Any = None

    def start(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._thread.start()
        broker = self._broker = Broker(config, loop=self._loop)
        fut = asyncio.run_coroutine_threadsafe(broker.start(), self._loop)
        fut.result(timeout=15)
        log.info("embedded broker on %s:%s", self.host, self.port)

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
            except Exception as exc:
                log.debug("broker shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
