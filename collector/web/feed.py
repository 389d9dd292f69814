"""The change feed behind ``GET /api/events`` (server-sent events).

One thread looks at the store every ``interval_s`` (new evidence, incidents changed, audit entries: each
read by an index from where it last stopped) and tells every open page which room PCs and incidents
changed, so a page fetches just those again. Each subscriber hears only of what it may see: a PIC, of
their unit's PCs and incidents. Works the same whether ingest runs in this process or in workers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from collector import queries
from collector.users import User

log = logging.getLogger(__name__)
QUEUE_MAX = 64


@dataclass(eq=False)
class Subscriber:
    user: User
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))


class ChangeFeed:
    def __init__(self, reader: Any, interval_s: float = 0.25) -> None:
        self.reader = reader
        self.interval_s = interval_s
        self.subscribers: set[Subscriber] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.seq = 0
        self._ev = self._au = 0
        self._upd = ""
        self._recent: dict[str, str] = {}  # incident id -> updated_at already announced

    def _start_marks(self) -> None:
        q = self.reader.query
        self._ev = int(q("SELECT coalesce(max(id), 0) AS n FROM evidence")[0]["n"])
        self._au = int(q("SELECT coalesce(max(id), 0) AS n FROM audit")[0]["n"])
        self._upd = str(q("SELECT coalesce(max(updated_at), '') AS t FROM incidents")[0]["t"])

    def subscribe(self, user: User) -> Subscriber:
        sub = Subscriber(user, asyncio.get_running_loop())
        with self.lock:
            self.subscribers.add(sub)
            if self.thread is None and not self.stopping.is_set():
                self._start_marks()
                self.thread = threading.Thread(target=self._run, name="pantau-feed", daemon=True)
                self.thread.start()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self.lock:
            self.subscribers.discard(sub)

    def close(self) -> None:
        self.stopping.set()
        with self.lock:
            subs = list(self.subscribers)
        for s in subs:
            self._deliver(s, None)
        if self.thread is not None:
            self.thread.join(5)

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                change = self.poll()
            except Exception:
                log.exception("the change feed could not read the store; trying again")
                time.sleep(1)
                continue
            if change is not None:
                self.publish(change)

    def poll(self) -> dict[str, Any] | None:
        """What changed since the last call: room PCs and incidents (None: nothing)."""
        q = self.reader.query
        agents: set[str] = set()
        incidents: set[str] = set()
        rows = q("SELECT id, agent FROM evidence WHERE id > ? ORDER BY id LIMIT 20000", (self._ev,))
        if rows:
            self._ev = int(rows[-1]["id"])
            agents.update(r["agent"] for r in rows)
        rows = q("SELECT id, agent, updated_at FROM incidents WHERE updated_at >= ? ORDER BY updated_at LIMIT 5000",
                 (self._upd,))
        for r in rows:
            if self._recent.get(r["id"]) != r["updated_at"]:
                incidents.add(r["id"])
                agents.add(r["agent"])
                self._recent[r["id"]] = r["updated_at"]
        if rows:
            top = rows[-1]["updated_at"]
            if top != self._upd:
                self._recent = {k: v for k, v in self._recent.items() if v >= top}
            self._upd = top
        rows = q("SELECT id, incident FROM audit WHERE id > ? ORDER BY id LIMIT 5000", (self._au,))
        if rows:
            self._au = int(rows[-1]["id"])
            incidents.update(r["incident"] for r in rows if r["incident"])
        if not agents and not incidents:
            return None
        self.seq += 1
        return {"seq": self.seq, "agents": sorted(agents), "incidents": sorted(incidents), "at": time.time()}

    def publish(self, change: dict[str, Any]) -> None:
        with self.lock:
            subs = list(self.subscribers)
        if not subs:
            return
        units: dict[str, str | None] | None = None
        agent_units: dict[str, str | None] = {}
        for s in subs:
            if not s.user.scoped:
                self._deliver(s, change)
                continue
            if units is None:
                units = queries.units_of_incidents(self.reader, change["incidents"])
                agent_units = {a: queries.unit_of_agent(self.reader, a) for a in change["agents"]}
            mine = {**change, "agents": [a for a in change["agents"] if agent_units.get(a) == s.user.unit],
                    "incidents": [i for i in change["incidents"] if units.get(i) == s.user.unit]}
            if mine["agents"] or mine["incidents"]:
                self._deliver(s, mine)

    @staticmethod
    def _deliver(s: Subscriber, msg: dict[str, Any] | None) -> None:
        def put() -> None:
            if s.queue.full():  # a page that does not read: it gets "everything changed" once it does
                while not s.queue.empty():
                    s.queue.get_nowait()
                s.queue.put_nowait({"seq": -1, "agents": [], "incidents": [], "resync": True})
            if msg is None or not s.queue.full():
                s.queue.put_nowait(msg)

        try:
            s.loop.call_soon_threadsafe(put)
        except RuntimeError:  # its loop is closed: the page went away
            pass
