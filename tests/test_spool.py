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


# ---------------------------------------------------------------- a real full disk (tests/fullfs.py)

def test_full_disk_keeps_events_in_memory_and_counts_drops(tmp_path: Path) -> None:
    from tests.fullfs import fill, small_fs

    with small_fs("1m") as fs:
        ob = Outbox(str(fs / "o.sqlite"), mem_max_events=4)
        first = [ob.put("a/events", f"before-{i}".encode()) for i in range(3)]
        filler = fill(fs)
        ids = []
        for i in range(10):
            keep = i in (1, 2)  # device.detached, say
            ids.append(ob.put("a/events", f"full-{i}".encode(), keep=keep))
        ob.put("a/state", b"online", retain=True)
        assert ob.disk_error is not None and ob.held > 0
        # nothing raised; memory holds the kept ones and the newest, within the bound
        held = [r.payload for r in ob.pending() if r.id > first[-1]]
        assert held == [b"full-1", b"full-2", b"full-8", b"full-9", b"online"]
        assert ob.dropped_total == 6 and ob.depth == 3 + 4
        assert ids == sorted(ids) and ids[0] == first[-1] + 1
        # a message delivered straight from memory is gone for good, not written later
        ob.ack(ids[8])
        assert ob.retry() is False  # the disk is still full
        filler.unlink()
        assert ob.retry() is True and ob.held == 0 and ob.disk_error is None
        ob.close()
        again = Outbox(str(fs / "o.sqlite"))
        assert [r.payload for r in again.pending()] == [
            b"before-0", b"before-1", b"before-2", b"full-1", b"full-2", b"full-9", b"online"]
        assert again.dropped_total == 6  # counted on disk with the backlog
        assert [r.id for r in again.pending()][3:] == [ids[1], ids[2], ids[9], ids[9] + 1]  # ids kept
        nxt = again.put("a/events", b"after")
        assert nxt == ids[9] + 2
        again.close()


def test_acknowledgements_on_a_full_disk_are_not_lost(tmp_path: Path) -> None:
    from tests.fullfs import fill, small_fs

    with small_fs("1m") as fs:
        ob = Outbox(str(fs / "o.sqlite"))
        ids = [ob.put("a/events", f"e{i}".encode()) for i in range(3)]
        filler = fill(fs)
        ob.ack(ids[0])  # the broker has it; the DELETE may be refused, but it never shows up again
        assert [r.payload for r in ob.pending()] == [b"e1", b"e2"] and ob.depth == 2
        filler.unlink()
        assert ob.retry() is True
        ob.close()
        assert [r.payload for r in Outbox(str(fs / "o.sqlite")).pending()] == [b"e1", b"e2"]


def test_tokens_say_when_a_message_is_safely_queued(tmp_path: Path) -> None:
    from tests.fullfs import fill, small_fs

    ob = Outbox(str(tmp_path / "o.sqlite"))
    assert ob.token_state("r1") is None
    ob.put("a/events", b"report", token="r1")
    assert ob.token_state("r1") == "queued" and ob.tokens() == {"r1"}
    ob.forget_token("r1")
    assert ob.token_state("r1") is None
    with small_fs("1m") as fs:
        ob = Outbox(str(fs / "o.sqlite"))
        filler = fill(fs)
        rid = ob.put("a/events", b"report", token="r2")
        assert ob.token_state("r2") == "held"
        ob.ack(rid)  # delivered from memory before the disk came back
        assert ob.token_state("r2") == "queued"
        filler.unlink()
        rid = ob.put("a/events", b"report", token="r3")
        assert ob.token_state("r3") == "queued"
        ob.close()


def test_a_retained_state_does_not_take_the_newest_events_place_and_a_lone_drop_count_reaches_the_disk(
        tmp_path: Path) -> None:
    """Found by running the agent on a full disk with the broker away: the newest attach was dropped because a
    retained state came after it, and a drop count with nothing else waiting never reached the disk."""
    from tests.fullfs import fill, small_fs

    with small_fs("1m") as fs:
        ob = Outbox(str(fs / "o.sqlite"), mem_max_events=2)
        filler = fill(fs)
        ob.put("a/events", b"attach-0")
        ob.put("a/events", b"detach-1", keep=True)
        ob.put("a/events", b"detach-2", keep=True)
        ob.put("a/events", b"attach-3")  # the newest event: kept (attach-0 goes)
        ob.put("a/state", b"online", retain=True)  # a reconnect queues the retained state after it
        assert [r.payload for r in ob.pending()] == [b"detach-1", b"detach-2", b"attach-3", b"online"]
        assert ob.dropped_total == 1
        for r in ob.pending():  # all delivered from memory: only the count waits
            ob.ack(r.id)
        filler.unlink()
        assert ob.retry() is True
        ob.close()
        again = Outbox(str(fs / "o.sqlite"))
        assert again.dropped_total == 1 and again.pending() == []
        again.close()
