"""The shipped broker configuration (deploy/mosquitto/pantau.conf and acl) with its paths moved into a
temporary folder and its listeners onto free loopback ports: it loads the dynamic security plugin; the
collector's account from the password file reads every agent; an agent enrolled through the plugin
publishes over TLS on its own topics only; a disabled one is refused."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from collector.dynsec import DynsecAdmin
from common.config import parse_broker
from tests.conftest import ROOT, free_port, stop_process, wait_port
from tests.enroll_helpers import ADMIN, ADMIN_PW, PLUGIN, Client, self_signed, wait_for

pytestmark = pytest.mark.broker
CONF = ROOT / "deploy" / "mosquitto" / "pantau.conf"


def shipped_broker(d: Path) -> tuple[subprocess.Popen[bytes], int, int, str]:
    os.chmod(d, 0o777)
    text = CONF.read_text()
    assert PLUGIN in text, "the shipped configuration does not load the dynamic security plugin"
    cert, key = self_signed(d)
    for p in (cert, key):
        os.chmod(p, 0o644)
    tls_port, local_port = free_port(), free_port()
    dyn = d / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(dyn), ADMIN, ADMIN_PW], check=True, capture_output=True)
    os.chmod(dyn, 0o666)
    pw = d / "pantau.passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "pantau-collector", "collector-pass-1"], check=True)
    os.chmod(pw, 0o644)
    shutil.copy(ROOT / "deploy" / "mosquitto" / "acl", d / "pantau.acl")
    os.chmod(d / "pantau.acl", 0o644)
    moves = {"/etc/mosquitto/pantau.passwd": str(pw), "/etc/mosquitto/pantau.acl": str(d / "pantau.acl"),
             "/etc/mosquitto/certs/ca.crt": cert, "/etc/mosquitto/certs/broker.crt": cert,
             "/etc/mosquitto/certs/broker.key": key, "/var/lib/mosquitto/dynamic-security.json": str(dyn)}
    for old, new in moves.items():
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r"^listener 8883$", f"listener {tls_port} 127.0.0.1", text, flags=re.M)
    text = re.sub(r"^listener 1883 127.0.0.1$", f"listener {local_port} 127.0.0.1", text, flags=re.M)
    conf = d / "mosquitto.conf"
    conf.write_text(f"log_dest stderr\npersistence_location {d}/\n{text}")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=open(d / "log", "wb"))  # noqa: SIM115
    wait_port(local_port)
    wait_port(tls_port)
    return proc, tls_port, local_port, cert


def test_the_shipped_config_loads_the_plugin_and_keeps_agents_to_their_topics() -> None:
    d = Path(tempfile.mkdtemp(prefix="pantau-dynsec-"))  # not under pytest's 0700 folders (broker runs as mosquitto)
    proc, tls_port, local_port, cert = shipped_broker(d)
    try:
        admin = DynsecAdmin(parse_broker(f"mqtt://127.0.0.1:{local_port}"), ADMIN, ADMIN_PW)
        admin.ensure_agent("room-1", "agent-pass-123456")
        collector = Client(f"mqtt://127.0.0.1:{local_port}", "pantau-collector", "collector-pass-1")
        assert collector.connack.value == 0
        collector.c.subscribe("pantau/v1/#", qos=1)
        agent = Client(f"mqtts://127.0.0.1:{tls_port}", "room-1", "agent-pass-123456", ca_file=cert)
        assert agent.connack.value == 0
        assert agent.publish("pantau/v1/agents/room-1/state", "mine") == 0
        agent.publish("pantau/v1/agents/aula-bpsdm/state", "theirs")
        assert wait_for(lambda: ("pantau/v1/agents/room-1/state", b"mine") in collector.got)
        assert not any(t.endswith("aula-bpsdm/state") for t, _ in collector.got)
        admin.disable_agent("room-1")
        assert wait_for(lambda: agent.disconnects)
        agent.close()
        again = Client(f"mqtts://127.0.0.1:{tls_port}", "room-1", "agent-pass-123456", ca_file=cert)
        assert again.connack.value == 135
        again.close()
        collector.close()
    finally:
        stop_process(proc)
        shutil.rmtree(d, ignore_errors=True)
