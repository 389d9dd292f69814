"""``pantau-agent enroll https://COLLECTOR TOKEN --fingerprint SHA256``: from an empty room PC to a
configured agent.

The collector is reached over HTTPS and trusted by the SHA-256 fingerprint of its certificate (shown
beside the token), checked *before* the token is sent: a machine in the middle never sees it. The
answer holds this PC's agent id, labels, broker URL, CA and broker account; they are written to the
agent's configuration (mode 0600) and the CA beside it. With ``--install`` the systemd unit is
written, and the service enabled and started.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

from agent.state import write_atomic
from common.config import parse_broker
from common.protocol import valid_agent_id

UNIT_PATH = "/etc/systemd/system/pantau-agent.service"
SERVICE_USER = "pantau-agent"
_HEX = re.compile(r"^[0-9a-f]{64}$")


class EnrollFailed(RuntimeError):
    """One line for the person at the room PC."""


def parse_fingerprint(text: str) -> bytes:
    """``AB:CD:...``, ``abcd...`` or ``SHA256:AB:CD...`` -> 32 bytes."""
    t = text.strip().lower()
    if t.startswith("sha256:") or t.startswith("sha256="):
        t = t[7:]
    t = t.replace(":", "").replace(" ", "")
    if not _HEX.match(t):
        raise EnrollFailed("--fingerprint: give the collector certificate's SHA-256 as 64 hex digits "
                           "(AB:CD:... as `pantau-collector enroll` prints it)")
    return bytes.fromhex(t)


def fetch(url: str, token: str, fingerprint: bytes, timeout_s: float = 30.0) -> dict[str, Any]:
    """POST the token to ``url``/enroll over HTTPS pinned to ``fingerprint``; the collector's answer."""
    u = urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise EnrollFailed(f"{url}: the collector's address must look like https://pantau.example.go.id:8443")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False  # trust comes from the pinned fingerprint, not a CA or the name
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout_s, context=ctx)
    try:
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            raise EnrollFailed(f"cannot reach {u.hostname}:{u.port or 443}: {exc}") from None
        sock = conn.sock
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not der or hashlib.sha256(der).digest() != fingerprint:
            seen = ":".join(f"{b:02X}" for b in hashlib.sha256(der or b"").digest())
            raise EnrollFailed(f"the certificate of {u.hostname} does not match the fingerprint (it presents "
                               f"{seen}): the token was not sent")
        base = u.path.rstrip("/")
        body = json.dumps({"token": token, "hostname": socket.gethostname()[:253]})
        try:
            conn.request("POST", f"{base}/enroll", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read(1 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise EnrollFailed(f"the collector did not answer: {exc}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if resp.status != 200:
        why = answer.get("error") if isinstance(answer, dict) else None
        raise EnrollFailed(f"refused by the collector: {why or f'HTTP {resp.status}'}")
    if not isinstance(answer, dict):
        raise EnrollFailed("the collector's answer is not a JSON object")
    return answer


def _toml_str(s: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also refuses a raw DEL."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def render_config(answer: dict[str, Any], ca_path: str | None, state_dir: str) -> str:
    """The agent's TOML configuration from the collector's answer (checked: nothing unsafe passes)."""
    agent = answer.get("agent_id")
    if not isinstance(agent, str) or not valid_agent_id(agent):
        raise EnrollFailed(f"the collector sent an invalid agent id {agent!r}")
    broker = answer.get("broker")
    if not isinstance(broker, str):
        raise EnrollFailed("the collector sent no broker address")
    try:
        parse_broker(broker)
    except ValueError as exc:
        raise EnrollFailed(f"the collector sent a bad broker address: {exc}") from None
    labels = answer.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) and re.match(
            r"^[A-Za-z0-9_-]{1,64}$", k) for k, v in labels.items()):
        raise EnrollFailed("the collector sent malformed labels")
    lines = ["# Written by `pantau-agent enroll`; keep it private (it holds this PC's broker password).",
             f"agent_id = {_toml_str(agent)}", f"broker = {_toml_str(broker)}"]
    for k in ("username", "password", "prefix"):
        v = answer.get(k)
        if v is not None:
            if not isinstance(v, str):
                raise EnrollFailed(f"the collector sent a non-text {k}")
            lines.append(f"{k} = {_toml_str(v)}")
    if ca_path:
        lines.append(f"ca_file = {_toml_str(ca_path)}")
    lines.append(f"state_dir = {_toml_str(state_dir)}")
    lines.append("labels = { " + ", ".join(f"{k} = {_toml_str(v)}" for k, v in sorted(labels.items())) + " }")
    return "\n".join(lines) + "\n"


def write_files(answer: dict[str, Any], config_path: str, state_dir: str, owner: str | None = None) -> list[str]:
    """Write the configuration (0600) and the CA beside it; ``owner`` (the service user) owns both.
    Returns the paths written."""
    directory = os.path.dirname(os.path.abspath(config_path))
    os.makedirs(directory, exist_ok=True)
    written = []
    ca_path = None
    ca = answer.get("ca")
    if ca:
        if not isinstance(ca, str) or "-----BEGIN CERTIFICATE-----" not in ca:
            raise EnrollFailed("the collector sent a CA that is not a PEM certificate")
        ca_path = os.path.join(directory, "ca.crt")
        write_atomic(ca_path, ca.encode(), 0o644)
        written.append(ca_path)
    text = render_config(answer, ca_path, state_dir)
    write_atomic(config_path, text.encode(), 0o600)
    written.append(config_path)
    if owner:
        import pwd

        pw = pwd.getpwnam(owner)
        for p in written:
            os.chown(p, pw.pw_uid, pw.pw_gid)
    return written


# ---------------------------------------------------------------- the service


def unit_text(exe: str, config_path: str, state_dir: str) -> str:
    """The systemd unit (the same as deploy/systemd/pantau-agent.service, with these paths)."""
    return UNIT_TEMPLATE.format(exe=exe, config=config_path, state_dir=state_dir,
                                state_name=os.path.basename(state_dir.rstrip("/")))


UNIT_TEMPLATE = """\
[Unit]
Description=Pantau agent: watches the lent USB camera and speakerphone of this room
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=pantau-agent
Group=pantau-agent
SupplementaryGroups=video audio plugdev
ExecStart={exe} --config {config} run
Environment=PANTAU_STATE_DIR={state_dir}
Environment=PANTAU_KERNEL_LOG=/dev/kmsg
StateDirectory={state_name}
StateDirectoryMode=0700
# /dev/kmsg needs CAP_SYSLOG; reading other processes' fd links needs CAP_SYS_PTRACE.
AmbientCapabilities=CAP_SYSLOG CAP_SYS_PTRACE
CapabilityBoundingSet=CAP_SYSLOG CAP_SYS_PTRACE
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
# A clean stop publishes agent.stopping and offline/shutdown, then flushes the outbox (a few seconds).
KillSignal=SIGTERM
TimeoutStopSec=15
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def ensure_service_user() -> None:
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    groups = [g for g in ("video", "audio", "plugdev") if _group_exists(g)]
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    if groups:
        cmd += ["--groups", ",".join(groups)]
    _run([*cmd, SERVICE_USER])


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def enroll(url: str, token: str, fingerprint: str, config_path: str, state_dir: str, install: bool = False,
           force: bool = False) -> tuple[dict[str, Any], bool]:
    """The whole command: fetch, write, and (``install``) start the service where systemd runs.
    Returns the answer and whether the service was started."""
    pin = parse_fingerprint(fingerprint)
    if os.path.exists(config_path) and not force:
        raise EnrollFailed(f"{config_path} exists already: give --force to replace it (this PC gets a new account)")
    if install and os.name == "posix" and os.geteuid() != 0:
        raise EnrollFailed("--install needs root (sudo)")
    answer = fetch(url, token.strip(), pin)
    owner = None
    if install:
        ensure_service_user()
        owner = SERVICE_USER
    write_files(answer, config_path, state_dir, owner)
    if install and systemd_running():
        install_service(config_path, state_dir)
        return answer, True
    return answer, False


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnrollFailed(f"{cmd[0]}: {exc}") from None
    if r.returncode != 0:
        raise EnrollFailed(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def install_service(config_path: str, state_dir: str, unit_path: str = UNIT_PATH) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "pantau-agent")
    if not os.path.exists(exe):
        exe = shutil.which("pantau-agent") or exe
    write_atomic(unit_path, unit_text(exe, config_path, state_dir).encode(), 0o644)
    _run(["systemctl", "daemon-reload"])
    _run(["systemctl", "enable", "pantau-agent.service"])
    _run(["systemctl", "restart", "pantau-agent.service"])
