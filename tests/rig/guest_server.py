"""The rig's command channel, inside the guest: one JSON request a line over TCP, one JSON answer.

{"cmd": "sh", "script": "...", "timeout": 30}  -> {"rc": 0, "out": "...", "err": "..."}
{"cmd": "spawn", "name": "agent", "script": "...", "log": "/tmp/agent.log"} -> {"pid": 123}
{"cmd": "kill", "name": "agent", "signal": 15} -> {"rc": -15}
It runs as PID 1 of a throw-away guest; orphans are not reaped (a reaper would steal exit
statuses from subprocess.run).
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import subprocess
import threading

PROCS: dict[str, subprocess.Popen[bytes]] = {}
LOCK = threading.Lock()


def handle(req: dict) -> dict:
    cmd = req.get("cmd")
    if cmd == "sh":
        done = subprocess.run(["/bin/sh", "-c", req["script"]], capture_output=True, timeout=req.get("timeout", 60))
        return {"rc": done.returncode, "out": done.stdout.decode(errors="replace"),
                "err": done.stderr.decode(errors="replace")}
    if cmd == "spawn":
        log = open(req.get("log", "/dev/null"), "ab")  # noqa: SIM115
        p = subprocess.Popen(["/bin/sh", "-c", "exec " + req["script"]], stdout=log, stderr=log,
                             env={**os.environ, **req.get("env", {})})
        with LOCK:
            PROCS[req["name"]] = p
        return {"pid": p.pid}
    if cmd == "kill":
        with LOCK:
            held = PROCS.pop(req["name"], None)
        if held is None:
            return {"rc": None}
        held.send_signal(req.get("signal", signal.SIGTERM))
        try:
            return {"rc": held.wait(req.get("timeout", 20))}
        except subprocess.TimeoutExpired:
            held.kill()
            return {"rc": held.wait()}
    return {"error": f"unknown command {cmd!r}"}


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                answer = handle(json.loads(line))
            except Exception as exc:  # answer every request, whatever happens
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    with Server(("0.0.0.0", 7000), Handler) as srv:
        srv.serve_forever()
