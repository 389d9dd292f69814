"""The one-command install without a package index: `pantau-collector bundle` builds the agent's wheels,
the collector serves them and install.sh over HTTPS, and `curl ... /install.sh | sh -s -- TOKEN`
installs into a fresh prefix, enrolls, and starts an agent whose `online` state reaches the broker under
its own account; disabling the agent drops it. Here there is no systemd, so install.sh runs the agent in
the background (its pid in the state directory); paths are redirected into a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import bundle, enroll
from tests.enroll_helpers import ADMIN, ADMIN_PW, Client, enroll_site, wait_for

pytestmark = pytest.mark.broker


@pytest.fixture
def site(tmp_path: Path, agent_bundle: str) -> Iterator[dict[str, Any]]:
    with enroll_site(tmp_path, agent_bundle) as s:
        yield s


def _pin(cert: str) -> str:
    import ssl

    with open(cert) as fh:
        return bundle.spki_pin(ssl.PEM_cert_to_DER_cert(fh.read()))


def test_curl_pipe_sh_installs_enrolls_and_starts_the_agent(site: dict[str, Any]) -> None:
    store, broker, d = site["store"], site["broker"], site["dir"]
    t = enroll.new_token(store, "setjen", "r1", 3600, "tester")
    watcher = Client(broker.url, ADMIN, ADMIN_PW)
    watcher.c.subscribe("pantau/v1/agents/+/state", qos=1)
    env = {"PATH": os.environ["PATH"], "PANTAU_INSTALL_DIR": str(d / "opt"),
           "PANTAU_CONFIG": str(d / "etc" / "agent.toml"), "PANTAU_STATE_DIR": str(d / "state"),
           "PANTAU_INSTALL_LOG": str(d / "agent.log")}
    cmd = f"curl -fsSLk --pinnedpubkey {_pin(site['cert'])} {site['url']}/install.sh | sh -s -- {t['token']}"
    pid = None
    try:
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=300, env=env, cwd=d)
        assert r.returncode == 0, r.stderr + r.stdout
        assert "enrolled as room-1 (unit setjen, room r1)" in r.stdout
        pid = int((d / "state" / "agent.pid").read_text())
        assert (d / "opt" / "bin" / "pantau-agent").exists()
        assert oct((d / "etc" / "agent.toml").stat().st_mode & 0o777) == "0o600"
        # the installed agent (not this checkout) publishes online under its own account
        assert wait_for(lambda: any(tp == "pantau/v1/agents/room-1/state" and json.loads(p).get("state") == "online"
                                    for tp, p in watcher.got), 60), (d / "agent.log").read_text()[-2000:]
        out = subprocess.run([str(d / "opt" / "bin" / "python"), "-c", "import agent; print(agent.__file__)"],
                             capture_output=True, text=True, cwd=d).stdout
        assert out.startswith(str(d / "opt"))
        # disabled: the broker drops it and it cannot come back
        enroll.disable_agent(store, site["settings"], "room-1", "tester", "PC replaced")
        time.sleep(3)
        log = (d / "agent.log").read_text()
        assert "not authori" in log.lower() or "refused" in log.lower(), log[-2000:]
        watcher.got.clear()
        time.sleep(2)
        assert not any(tp.startswith("pantau/v1/agents/room-1/") for tp, _ in watcher.got)
    finally:
        watcher.close()
        pidfile = d / "state" / "agent.pid"
        pid = pid or (int(pidfile.read_text()) if pidfile.exists() else None)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                print("agent already gone; its log:\n" + (d / "agent.log").read_text()[-3000:])


def test_a_wrong_pin_stops_curl_before_anything_runs(site: dict[str, Any]) -> None:
    r = subprocess.run(["curl", "-fsSLk", "--pinnedpubkey", "sha256//" + "A" * 43 + "=", f"{site['url']}/install.sh"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
