"""The collector's single writer, fed by MQTT receiver processes (``collector/receiver.py``).

Receivers, several processes on one shared subscription, do what scales with processes: MQTT, decoding
and validation. This side, in the collector's own process, does what must be done once and in order:
deduplicate, store, commit in large batches, and feed the classifier the committed evidence. Each
receiver's batch is acknowledged back to it only after the transaction holding it committed, so the
broker's acknowledgement still means "stored". A batch that cannot be stored is retried, never dropped.
A receiver that dies is started again; what it had not acknowledged, the broker delivers again (to it or
to another member of the group), and deduplication drops what was stored already.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from collector.ingest import Collector, Inbound
from collector.subscriber import BatchStoring
from common.config import parse_broker

log = logging.getLogger(__name__)

COMMIT_EVERY = 2000  # messages per transaction, at most
LEFTOVER = 8  # sessions of receivers (and of the worker processes of earlier releases) an earlier configuration
# may have left, looked for at start: a member of the group that nobody reads would keep taking its share
RESTART_DELAY_S = 1.0
FLAPPING_DROPS, FLAPPING_S = 5, 60.0  # this many losses of the broker within this long: health says so


class Writer(BatchStoring):
    def __init__(self, collector: Collector, cfg: Any, receivers: int, stalled_s: float = 30.0) -> None:
        self.collector = collector
        self.cfg = cfg
        self.n = receivers
        self.stalled_s = stalled_s
        self.q: queue.Queue[tuple[int, int, list[Any], float]] = queue.Queue()
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = [None] * (receivers + 1)  # the receivers, and the drain of leftover sessions
        self.conns: list[Connection | None] = [None] * (receivers + 1)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._closing = False
        self.status: dict[int, tuple[dict[str, Any], float]] = {}  # receiver -> (its last status, when)
        self._drops: dict[int, list[tuple[float, int]]] = {}  # receiver -> its counts of lost connections
        self.unreachable_s = 30.0
        self.started_at = time.monotonic()
        self.received = 0
        self.restarts = 0
        self._in_hand_since: float | None = None

    # ------------------------------------------------------------------ receivers
    def _spawn(self, i: int) -> None:
        from collector import receiver

        ours, theirs = self._ctx.Pipe(duplex=True)
        self._drops.pop(i, None)  # a new process counts its lost connections from 0
        if i < self.n:
            p = self._ctx.Process(target=receiver.main, args=(self.cfg, i, theirs), name=f"pantau-receiver-{i}",
                                  daemon=True)
        else:  # the sessions an earlier configuration left: emptied into the store, then ended
            # "": the session of the collector's own client id, which receives in-process (receivers = 0)
            left = ["", *(f"r{k}" for k in range(self.n, self.n + LEFTOVER)), *(f"w{k}" for k in range(LEFTOVER))]
            p = self._ctx.Process(target=receiver.drain_main, args=(self.cfg, left, theirs), name="pantau-drain",
                                  daemon=True)
        p.start()
        log.info("%s started (pid %s)", f"receiver {i}" if i < self.n else "drain of leftover sessions", p.pid)
        theirs.close()
        self.procs[i], self.conns[i] = p, ours
        threading.Thread(target=self._read, args=(i, ours), name=f"pantau-writer-read-{i}", daemon=True).start()

    def _read(self, i: int, conn: Connection) -> None:
        while not self._stop.is_set():
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            head, body = pickle.loads(data)
            if head == "status":  # how the receiver's broker connection stands
                now = time.monotonic()
                self.status[i] = (body, now)
                seen = self._drops.setdefault(i, [])  # (when, its count of lost connections), the last minute's
                seen.append((now, int(body.get("disconnects") or 0)))
                while len(seen) > 1 and seen[1][0] <= now - FLAPPING_S:
                    del seen[0]  # the oldest left is the count as it stood a minute ago
                continue
            self.q.put((i, head, body, time.monotonic()))
        if i >= self.n:
            return  # the drain ends when it is done
        if not self._closing:
            log.warning("receiver %d exited (%s); starting it again", i, self.procs[i].exitcode)
            time.sleep(RESTART_DELAY_S)
            if not self._closing:
                self.restarts += 1
                self._spawn(i)

    # ------------------------------------------------------------------ writing
    def _take(self) -> list[tuple[int, int, list[Any], float]] | None:
        try:
            first = self.q.get(timeout=0.2)
        except queue.Empty:
            return None
        got = [first]
        n = len(first[2])
        while n < COMMIT_EVERY:
            try:
                nxt = self.q.get_nowait()
            except queue.Empty:
                break
            got.append(nxt)
            n += len(nxt[2])
        self._in_hand_since = first[3]
        return got

    def _work(self) -> None:
        while not (self._stop.is_set() and self.q.empty()):
            got = self._take()
            if got is None:
                self._quiet()
                continue
            items = [Inbound(t, p, rx, from_broker=True, refused=why, checked=why is None, facts=facts,
                             retained=retained)
                     for _, _, batch, _ in got for t, p, rx, why, facts, retained in batch]
            if not self._store_batch(items):
                return
            self.received += len(items)
            self._in_hand_since = None
            for i, batch_id, _, _ in got:  # ack after commit: each receiver acknowledges its batches now
                conn = self.conns[i]
                try:
                    if conn is not None:
                        with self._send_lock:
                            conn.send(batch_id)
                except (OSError, ValueError):
                    pass  # that receiver is gone; the broker delivers its messages again

    # ------------------------------------------------------------------ health
    def health(self) -> list[str]:
        now = time.monotonic()
        out = []
        since = self._in_hand_since
        if since is None:
            with self.q.mutex:
                since = self.q.queue[0][3] if self.q.queue else None
        last = self.last_commit or self.started_at
        if since is not None and now - since > self.stalled_s and now - last > self.stalled_s:
            out.append(f"{self.q.qsize()} receiver batches waiting, no batch committed for {now - last:.0f} s")
        if self.last_batch_error is not None:
            out.append(f"storing the last batch failed: {self.last_batch_error}")
        out += [f"receiver {i} is not running (exit {p.exitcode})" for i, p in enumerate(self.procs[:self.n])
                if p is not None and not p.is_alive() and not self._closing]
        b = parse_broker(self.cfg.broker)
        broker = f"{b.host}:{b.port}"
        for i in range(self.n):
            st, at = self.status.get(i, ({"connected": False, "down_since_s": now - self.started_at,
                                          "last_error": None}, now))
            down = None if st["connected"] else (st["down_since_s"] or 0.0) + (now - at)
            if down is not None and down > self.unreachable_s:
                out.append(f"receiver {i} not connected to the MQTT broker {broker} for {down:.0f} s: "
                           f"{st.get('last_error') or 'connecting'}")
            seen = self._drops.get(i, [])
            if seen and seen[-1][1] - seen[0][1] >= FLAPPING_DROPS:
                out.append(f"receiver {i} lost the MQTT broker {FLAPPING_DROPS} times within {FLAPPING_S:.0f} s "
                           f"({st.get('last_error') or 'reconnecting'}): is another process using client id "
                           f"{self.cfg.client_id}-r{i} (a collector left running, or a second one with this "
                           "configuration)?")
        return out

    def stats(self) -> dict[str, Any]:
        return {"receivers": self.n, "received": self.received, "batches": self.batches,
                "batch_failures": self.batch_failures, "receiver_restarts": self.restarts,
                "queue_depth": self.q.qsize()}

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.started_at = time.monotonic()
        for i in range(self.n + 1):
            self._spawn(i)
        self._thread = threading.Thread(target=self._work, name="pantau-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the receivers first (they stop reading), then store what they handed over. What they
        could not acknowledge any more, the broker delivers again, and deduplication drops it."""
        self._closing = True
        for p in self.procs:
            if p is not None and p.is_alive():
                p.terminate()
        for p in self.procs:
            if p is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
        self._stop.set()
        self._thread.join(timeout=15)
