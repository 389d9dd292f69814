"""Configuration: the shipped examples load; bad values stop with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.config import load as load_agent
from collector.config import load as load_collector
from tests.conftest import ROOT, run_cli


def test_example_files_load(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    a = load_agent(str(ROOT / "deploy" / "agent.example.toml"), env={}, ca_file=str(ca))
    assert a.agent_id == "setjen-ruang-sidang-utama" and a.broker_url.tls and a.broker_url.port == 8883
    assert a.labels == {"unit": "setjen", "room": "ruang-sidang-utama"}
    c = load_collector(str(ROOT / "deploy" / "collector.example.toml"), env={})
    assert c.windows.missing_s == 600 and c.http_host_port == ("127.0.0.1", 8080)


@pytest.mark.parametrize(("env", "key"), [
    ({"PANTAU_AGENT_ID": "Not Valid!"}, "agent_id"),
    ({"PANTAU_BROKER": "http://x"}, "broker"),
    ({"PANTAU_USB_BACKEND": "magic"}, "usb_backend"),
    ({"PANTAU_USB_BACKEND": "simulated"}, "simulated_bus"),
    ({"PANTAU_POLL_S": "-1"}, "PANTAU_POLL_S"),
    ({"PANTAU_POLL_S": "fast"}, "PANTAU_POLL_S"),
    ({"PANTAU_SPOOL_MAX_EVENTS": "0"}, "PANTAU_SPOOL_MAX_EVENTS"),
    ({"PANTAU_LABELS": "unit"}, "PANTAU_LABELS"),
    ({"PANTAU_WATCH_VIDPID": "46d:843"}, "watch_vidpid"),
    ({"PANTAU_CA_FILE": "/nonexistent.crt"}, "ca_file"),
    ({"PANTAU_MQTT_VERSION": "4"}, "mqtt_version"),
    ({"PANTAU_POLL_S": "inf"}, "PANTAU_POLL_S"),  # passed "> 0", then stopped the agent with a traceback
    ({"PANTAU_TELEMETRY_S": "1e9"}, "PANTAU_TELEMETRY_S"),  # beyond the protocol's interval_s
    ({"PANTAU_INFLIGHT_MAX": "70000"}, "PANTAU_INFLIGHT_MAX"),
    ({"PANTAU_BROKER": "mqtt://x:0"}, "broker"),
])
def test_agent_errors_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_agent(env={"PANTAU_AGENT_ID": "room-1", **env})
    assert key in str(ei.value) and "\n" not in str(ei.value)


def test_unknown_toml_key_and_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('agent_idd = "x"\n')
    with pytest.raises(ConfigError, match="agent_idd: unknown key"):
        load_agent(str(f), env={})
    f.write_text("agent_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent(str(f), env={})
    f.write_text("[windows]\nmissing_s = -5\n")
    with pytest.raises(ConfigError, match="missing_s"):
        load_collector(str(f), env={})


def test_collector_errors_name_the_key() -> None:
    for env, key in [({"PANTAU_HTTP": "nowhere"}, "http"), ({"PANTAU_LANG": "fr"}, "lang"),
                     ({"PANTAU_INFLUX_URL": "http://x"}, "influx_bucket"), ({"PANTAU_BROKER": "tcp://x"}, "broker")]:
        with pytest.raises(ConfigError, match=key):
            load_collector(env=env)


def test_cli_bad_config_is_one_line_and_exit_2() -> None:
    import os

    out = run_cli("agent.cli", "once", env={**os.environ, "PANTAU_AGENT_ID": "BAD ID"})
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "agent_id" in out.stderr
    out = run_cli("collector.cli", "serve", env={**os.environ, "PANTAU_HTTP": "x"})
    assert out.returncode == 2 and "http" in out.stderr


@pytest.mark.parametrize("cmd", ["agent.cli", "collector.cli"])
def test_help_and_version(cmd: str) -> None:
    assert run_cli(cmd, "--help").returncode == 0
    v = run_cli(cmd, "--version")
    assert v.returncode == 0 and "1.1.0" in v.stdout


@pytest.mark.parametrize(("text", "key"), [
    ("poll_s = true\n", "poll_s"),
    ("spool_max_events = 2.7\n", "spool_max_events"),
    ('watch_kinds = {camera = 1}\n', "watch_kinds"),
    ("telemetry_s = inf\n", "telemetry_s"),
])
def test_agent_file_values_of_the_wrong_type_are_refused(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text('agent_id = "room-1"\n' + text)
    with pytest.raises(ConfigError) as ei:
        load_agent(str(f), env={})
    assert str(ei.value).startswith(f"config: {key}: ") and "\n" not in str(ei.value)


def test_config_files_as_windows_editors_save_them(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_bytes(b"\xef\xbb\xbfagent_id = \"room-1\"\nmqtt_version = 5\n")  # UTF-8 with a BOM, 5 a number
    assert (load_agent(str(f), env={}).agent_id, load_agent(str(f), env={}).mqtt_version) == ("room-1", "5")
    f.write_bytes('agent_id = "room-1"\nlabels = {room = "Ruang \xe9"}\n'.encode("cp1252"))  # "ANSI"
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_agent(str(f), env={})
    c = tmp_path / "c.toml"
    c.write_text('prefix = "a/b"\n')
    with pytest.raises(ConfigError, match="config: prefix: "):
        load_collector(str(c), env={})
    c.write_text("mqtt_version = 5\n")
    assert load_collector(str(c), env={}).mqtt_version == "5"


def test_simulate_uses_the_configs_bus_and_state_folder(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys
    import time

    bus, state = tmp_path / "bus.json", tmp_path / "state"
    bus.write_text(json.dumps({"devices": []}))
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'agent_id = "room-1"\nsimulated_bus = "{bus}"\nstate_dir = "{state}"\n'
                   'broker = "mqtt://127.0.0.1:1"\nself_test = false\n')
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTAU_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(cfg), "simulate"], cwd=work,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not state.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        err = proc.communicate(timeout=20)[1]
    assert state.is_dir() and not (work / "var").exists(), err


def test_a_whole_config_check_names_the_variable_a_value_came_from() -> None:
    with pytest.raises(ConfigError, match=r"^config: agent_id \(from PANTAU_AGENT_ID\): 'Bad!'"):
        load_agent(env={"PANTAU_AGENT_ID": "Bad!"})
    with pytest.raises(ConfigError, match=r"^config: http \(from PANTAU_HTTP\): "):
        load_collector(env={"PANTAU_HTTP": "nowhere"})
