"""The outbox on its own: durability across reopen, order, bound and overflow accounting."""

from __future__ import annotations

from pathlib import Path

from agent.spool import Outbox


def test_survives_reopen_in_order(tmp_path: Path) -> None:
    ob = Outbox(str(tmp_path / "o.sqlite"))
    ids = [ob.put("p/v1/agents/a/events", f"e{i}".encode()) for i in range(5)]
    ob.ack(ids[1])
    ob.close()
    ob = Outbox(str(tmp_path / "o.sqlite"))
    assert [r.payload for r in ob.pending()] == [b"e0", b"e2", b"e3", b"e4"]
    assert [r.payload for r in ob.pending(after_id=ids[2])] == [b"e3", b"e4"]
    assert ob.depth == 4


def test_overflow_drops_oldest_events_and_counts_them(tmp_path: Path) -> None:
    ob = Outbox(str(tmp_path / "o.sqlite"), max_events=3)
    for i in range(7):
        ob.put("p/v1/agents/a/events", f"e{i}".encode())
    assert [r.payload for r in ob.pending()] == [b"e4", b"e5", b"e6"]
    assert ob.dropped_total == 4
    ob.close()
    assert Outbox(str(tmp_path / "o.sqlite"), max_events=3).dropped_total == 4


def test_byte_bound(tmp_path: Path) -> None:
    ob = Outbox(str(tmp_path / "o.sqlite"), max_bytes=250)
    for i in range(5):
        ob.put("t/events", bytes([65 + i]) * 100)
    assert ob.size_bytes <= 250 and ob.depth == 2 and ob.dropped_total == 3


def test_retained_rows_supersede_and_do_not_evict_events(tmp_path: Path) -> None:
    ob = Outbox(str(tmp_path / "o.sqlite"), max_events=2)
    ob.put("a/events", b"e1")
    ob.put("a/events", b"e2")
    ob.put("a/state", b"online-1", retain=True)
    ob.put("a/inventory", b"inv-1", retain=True)
    ob.put("a/state", b"online-2", retain=True)
    assert [r.payload for r in ob.pending()] == [b"e1", b"e2", b"inv-1", b"online-2"]
    assert ob.dropped_total == 0 and ob.depth == 2
    [state] = [r for r in ob.pending() if r.topic == "a/state"]
    ob.ack(state.id)
    assert ob.depth == 2 and not ob.empty
