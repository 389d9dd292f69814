"""Agent accounts on Mosquitto, through its dynamic security plugin (``$CONTROL/dynamic-security/v1``).

Each enrolled agent gets one broker client (username = agent id, a random password) with a role of
its own, ``pantau-agent-<agent_id>``, that may publish to ``<prefix>/v1/agents/<agent_id>/#`` and
nothing else. Disabling an agent disables its client: the broker drops its connection at once and
refuses it from then on; enabling it again (a new enrollment of the same room PC) sets a new password.

The commands are sent by an account holding the plugin's ``admin`` role (``mosquitto_ctrl dynsec
init``), on a connection of its own: its username must differ from the collector's subscriber
account, since ``use_username_as_clientid`` makes a second connection of one account end the first.
Measured on Mosquitto 2.0.11 (Debian bookworm): ``disableClient`` disconnects the client
("disconnected by administrative action") and later CONNECTs get "not authorized".
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from common.config import Broker

TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE = TOPIC + "/response"


class DynsecError(RuntimeError):
    """The broker could not be reached or refused a command: one line saying which and why."""


def role_name(agent_id: str) -> str:
    return f"pantau-agent-{agent_id}"


def agent_acls(agent_id: str, prefix: str) -> list[dict[str, Any]]:
    return [{"acltype": "publishClientSend", "topic": f"{prefix}/v1/agents/{agent_id}/#", "allow": True,
             "priority": 0}]


@dataclass(frozen=True)
class DynsecAdmin:
    broker: Broker
    username: str
    password: str
    ca_file: str | None = None
    timeout_s: float = 10.0

    def run(self, commands: list[dict[str, Any]], allow: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Send ``commands`` in one message and return the responses in order. A response whose
        ``error`` is not in ``allow`` raises ``DynsecError`` naming the command."""
        responses = self._exchange(commands)
        for cmd, resp in zip(commands, responses, strict=False):
            err = resp.get("error")
            if err and err not in allow:
                raise DynsecError(f"broker: {cmd['command']} refused: {err}")
        return responses

    def _exchange(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        corr = uuid.uuid4().hex
        for i, c in enumerate(commands):
            c.setdefault("correlationData", f"{corr}-{i}")
        got: dict[str, dict[str, Any]] = {}
        connected, subscribed, done = threading.Event(), threading.Event(), threading.Event()
        failure: list[str] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.username, protocol=mqtt.MQTTv311)
        client.username_pw_set(self.username, self.password)
        if self.broker.tls:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            client.tls_set_context(ctx)

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            if rc.is_failure:
                failure.append(f"broker: {self.username} cannot sign in at {self.broker.host}:{self.broker.port}: "
                               f"{rc}")
                done.set()
            connected.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            try:
                for r in json.loads(msg.payload).get("responses", []):
                    if isinstance(r, dict) and str(r.get("correlationData", "")).startswith(corr):
                        got[str(r["correlationData"])] = r
            except (ValueError, AttributeError):
                return
            if len(got) == len(commands):
                done.set()

        client.on_connect = on_connect
        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        try:
            client.connect(self.broker.host, self.broker.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise DynsecError(f"broker: cannot reach {self.broker.host}:{self.broker.port}: {exc}") from None
        client.loop_start()
        try:
            end = time.monotonic() + self.timeout_s
            if not connected.wait(self.timeout_s):
                raise DynsecError(f"broker: no answer from {self.broker.host}:{self.broker.port} within "
                                  f"{self.timeout_s:g} s")
            if failure:
                raise DynsecError(failure[0])
            client.subscribe(RESPONSE, qos=1)
            if not subscribed.wait(max(0.1, end - time.monotonic())):
                raise DynsecError("broker: the subscription to the dynamic security responses was not acknowledged")
            client.publish(TOPIC, json.dumps({"commands": commands}), qos=1)
            if not done.wait(max(0.1, end - time.monotonic())):
                raise DynsecError("broker: no answer from the dynamic security plugin (is it loaded, and does "
                                  f"{self.username!r} hold its admin role?)")
            if failure:
                raise DynsecError(failure[0])
        finally:
            client.disconnect()
            client.loop_stop()
        return [got.get(c["correlationData"], {}) for c in commands]

    # ---------------------------------------------------------------- agents

    def ensure_agent(self, agent_id: str, password: str, prefix: str = "pantau") -> None:
        """The agent's role and client exist, the client is enabled and has ``password``."""
        role = role_name(agent_id)
        self.run([{"command": "createRole", "rolename": role, "textname": f"Pantau agent {agent_id}",
                   "acls": agent_acls(agent_id, prefix)}], allow=("Role already exists",))
        created = self.run([{"command": "createClient", "username": agent_id, "password": password,
                             "textname": f"Pantau agent {agent_id}", "roles": [{"rolename": role, "priority": 0}]}],
                           allow=("Client already exists",))
        if created[0].get("error"):  # re-enrolment of the same room PC
            self.run([{"command": "modifyClient", "username": agent_id, "password": password,
                       "roles": [{"rolename": role, "priority": 0}]},
                      {"command": "enableClient", "username": agent_id}])

    def disable_agent(self, agent_id: str) -> bool:
        """Disable the agent's client (its connection is dropped); False if the broker has no such client."""
        r = self.run([{"command": "disableClient", "username": agent_id}], allow=("Client not found",))
        return not r[0].get("error")

    def enable_agent(self, agent_id: str) -> bool:
        """Enable the agent's client again, password unchanged; False if the broker has no such client."""
        r = self.run([{"command": "enableClient", "username": agent_id}], allow=("Client not found",))
        return not r[0].get("error")

    def client_info(self, agent_id: str) -> dict[str, Any] | None:
        r = self.run([{"command": "getClient", "username": agent_id}], allow=("Client not found",))
        client = (r[0].get("data") or {}).get("client")
        return client if isinstance(client, dict) else None
