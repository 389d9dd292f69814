"""The InfluxDB sink against real servers: VictoriaMetrics takes /api/v2/write; InfluxDB 1.6.7
answers it with 404, so every batch must be buffered, counted, and delivered once a working
server is configured."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.ingest import Collector, Inbound
from collector.store.influx import InfluxSink
from collector.store.sqlite import SqliteStore
from tests.builder import CAM, Agent
from tests.conftest import free_port, stop_process, wait_port
from tests.procs import wait_until


class Server:
    def __init__(self, args: list[str], port: int, workdir: Path) -> None:
        self.port, self.dir = port, workdir
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)
        wait_port(port, 30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def victoria() -> Iterator[Server]:
    if shutil.which("victoria-metrics") is None:
        pytest.fail("victoria-metrics is not installed: run `make test`")
    d = Path(tempfile.mkdtemp(prefix="pantau-vm-"))
    port = free_port()
    s = Server(["victoria-metrics", f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={d}/data",
                "-search.latencyOffset=0s"], port, d)
    yield s
    s.stop()


@pytest.fixture
def influxdb16() -> Iterator[Server]:
    if shutil.which("influxd") is None:
        pytest.fail("influxd (InfluxDB 1.x) is not installed: run `make test`")
    d = Path(tempfile.mkdtemp(prefix="pantau-influx-"))
    conf = subprocess.run(["influxd", "config"], capture_output=True, text=True, check=True).stdout
    http_port = free_port()
    out, section = [], ""
    for line in conf.splitlines():
        if line.strip().startswith("["):
            section = line.strip()
        if line.strip().startswith("bind-address"):
            port = http_port if section == "[http]" else free_port()
            line = f'  bind-address = "127.0.0.1:{port}"'
        line = re.sub(r'^(\s*)(dir|wal-dir) = ".*"', lambda m: f'{m.group(1)}{m.group(2)} = "{d}/{m.group(2)}"',
                      line)
        out.append(line)
    (d / "influxdb.conf").write_text("\n".join(out) + "\n")
    s = Server(["influxd", "run", "-config", str(d / "influxdb.conf")], http_port, d)
    yield s
    s.stop()


def vm_series(url: str) -> list[dict]:
    urllib.request.urlopen(url + "/internal/force_flush", timeout=5).read()
    q = urllib.parse.quote('{__name__=~"pantau_.*"}')
    with urllib.request.urlopen(f"{url}/api/v1/export?match[]={q}", timeout=5) as r:
        return [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]


def collector_with(sink: InfluxSink, tmp: Path) -> Collector:
    return Collector(SqliteStore(str(tmp / "c.sqlite")), timeseries=sink)


def feed_room(c: Collector, telemetry_count: int) -> None:
    """An agent's start and ``telemetry_count`` telemetry messages, through the live ingest path."""
    a = Agent().started(devices=[CAM])
    for i in range(telemetry_count):
        a.telemetry(1 + i, [CAM["key"]])
    for line in a.lines:
        rec = json.loads(line)
        c.ingest([Inbound(rec["topic"], json.dumps(rec["payload"]).encode(), time.time())])


def test_points_reach_victoria_metrics(tmp_path: Path, victoria: Server) -> None:
    sink = InfluxSink(victoria.url, "token-ignored", "org", "pantau", str(tmp_path / "buf.sqlite"),
                      flush_interval_ms=200)
    c = collector_with(sink, tmp_path)
    feed_room(c, 5)
    sink.flush()
    series = wait_until(lambda: (s := vm_series(victoria.url)) and len(s) >= 6 and s, 20,
                        what="series in VictoriaMetrics")
    by_name = {(s["metric"]["__name__"], s["metric"].get("device", "")): s for s in series}
    present = by_name[("pantau_device_present", CAM["key"])]
    assert present["metric"]["agent"] == "room-1" and present["metric"]["unit"] == "setjen"
    assert present["metric"]["kind"] == "camera" and present["metric"]["room"] == "r1"
    assert present["values"] == [1] * 5
    assert len(by_name[("pantau_host_cpu_pct", "")]["values"]) == 5
    assert sink.buffer_depth() == 0 and sink.written_lines == 10 and sink.refused_batches == 0
    sink.close()


def test_refused_batches_are_buffered_then_delivered(tmp_path: Path, influxdb16: Server, victoria: Server) -> None:
    buf = str(tmp_path / "buf.sqlite")
    sink = InfluxSink(influxdb16.url, "t", "org", "pantau", buf, flush_interval_ms=200)
    c = collector_with(sink, tmp_path)
    feed_room(c, 4)
    wait_until(lambda: sink.buffer_depth() == 8, 30, what="refused points in the buffer")
    assert c.metrics()["buffer_depth"] == 8
    assert sink.refused_batches >= 1 and sink.written_lines == 0
    assert sink.retry_buffer() == 0  # still the 1.x server: still refused, still kept
    assert sink.buffer_depth() == 8
    sink.close()
    moved = InfluxSink(victoria.url, "t", "org", "pantau", buf)  # pointed at a working server
    assert moved.retry_buffer() == 8 and moved.buffer_depth() == 0
    series = wait_until(lambda: (s := vm_series(victoria.url)) and sum(len(x["values"]) for x in s) >= 24 and s, 20)
    total = sum(len(x["values"]) for x in series)
    assert total == 4 * (4 + 5)  # 4 telemetry messages x (4 host fields, temp_c is null + 5 device), once each
    moved.close()
