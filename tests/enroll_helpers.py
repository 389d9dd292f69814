"""Shared by the enrollment tests: a Mosquitto with the dynamic security plugin, a self-signed
certificate, and a collector web server on HTTPS with enrollment set up."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector import audit, enroll
from collector.dynsec import DynsecAdmin
from collector.ingest import Collector
from collector.registry import load_toml
from collector.store.sqlite import SqliteStore
from collector.web.server import WebServer
from common.config import parse_broker
from tests.conftest import Mosquitto
from tests.web_helpers import REGISTRY

PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
ADMIN, ADMIN_PW = "pantau-admin", "admin-pass-123456"


def self_signed(d: Path, name: str = "localhost") -> tuple[str, str]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


class DynsecMosquitto(Mosquitto):
    """The test Mosquitto with the dynamic security plugin and no anonymous access."""

    def __init__(self) -> None:
        super().__init__()
        dyn = self.dir / "dynamic-security.json"
        subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(dyn), ADMIN, ADMIN_PW], check=True,
                       capture_output=True)
        os.chmod(dyn, 0o666)  # the broker runs as user mosquitto and saves changes into it
        text = self.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        self.conf.write_text(text + f"plugin {PLUGIN}\nplugin_opt_config_file {dyn}\n"
                             "per_listener_settings false\n")

    def admin(self) -> DynsecAdmin:
        return DynsecAdmin(parse_broker(self.url), ADMIN, ADMIN_PW)


@contextmanager
def enroll_site(tmp_path: Path, bundle_dir: str | None = None,
                reach_as: str = "127.0.0.1") -> Iterator[dict[str, Any]]:
    """The collector and broker listen on 127.0.0.1; room PCs are told to reach both as ``reach_as``
    (the QEMU rig's guest sees this host as 10.0.2.2)."""
    if not os.path.exists(PLUGIN):
        pytest.fail(f"{PLUGIN} is missing: Debian's mosquitto package ships it")
    broker = DynsecMosquitto()
    broker.start()
    cert, key = self_signed(tmp_path)
    db = str(tmp_path / "pantau.sqlite")
    audit.configure(db)
    store = SqliteStore(db)
    (tmp_path / "registry.toml").write_text(REGISTRY)
    load_toml(store, str(tmp_path / "registry.toml"))
    collector = Collector(store)
    web = WebServer(collector, "127.0.0.1", 0, tls=(cert, key))
    web.start()
    url = web.address.rstrip("/").replace("//127.0.0.1:", f"//{reach_as}:", 1)
    agent_broker = broker.url.replace("//127.0.0.1:", f"//{reach_as}:", 1)
    settings = enroll.EnrollSettings(public_url=url, cert_file=cert, dynsec=broker.admin(), agent_broker=agent_broker,
                                     bundle_dir=bundle_dir or str(tmp_path / "bundle"))
    enroll.configure(settings)
    try:
        yield {"broker": broker, "store": store, "collector": collector, "url": url, "settings": settings, "cert": cert,
               "dir": tmp_path, "fingerprint": enroll.cert_fingerprint(cert)}
    finally:
        enroll.configure(None)
        web.stop()
        store.close()
        broker.close()


class Client:
    """A paho client that records its connection result, disconnects and PUBACK reason codes."""

    def __init__(self, url: str, username: str, password: str, ca_file: str | None = None) -> None:
        b = parse_broker(url)
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pantau-agent-{username}", protocol=mqtt.MQTTv5)
        self.c.username_pw_set(username, password)
        if b.tls:
            self.c.tls_set(ca_certs=ca_file)
        self.connack: Any = None
        self.disconnects: list[str] = []
        self.acks: dict[int, int] = {}
        self.got: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(str(rc))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.connect(b.host, b.port)
        self.c.loop_start()
        assert self.ready.wait(10), "no CONNACK"

    def _on_connect(self, c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        self.connack = rc
        self.ready.set()

    def publish(self, topic: str, payload: str) -> int:
        info = self.c.publish(topic, payload, qos=1)
        end = time.monotonic() + 10
        while info.mid not in self.acks and time.monotonic() < end:
            time.sleep(0.02)
        return self.acks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_for(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())
