"""Broker accounts end with the lease, against a real Mosquitto with its dynamic security plugin: when
every loan of an enrolled room PC's room has ended or been returned, the lease sweep disables its
account (the broker drops the connection and refuses it, audited "lease ended"), once; a loan running
again enables it with the password it had; an enrollment after the lease ended is left alone, an
operator's disable is never undone, and a broker that cannot be reached changes nothing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collector import enroll, leases, registry
from collector.dynsec import DynsecAdmin
from collector.store.sqlite import SqliteStore
from common.config import parse_broker
from common.protocol import now_ts
from tests.conftest import free_port
from tests.enroll_helpers import ADMIN, ADMIN_PW, Client, enroll_site, wait_for

pytestmark = pytest.mark.broker

CAM, SPK = "046d:085e:CAM1", "0b0e:2456:SPK1"  # CAM is lent to r1 until 2027-01-04 by the registry
TODAY = datetime.now(UTC).date()
YESTERDAY, NEXT_MONTH = (TODAY - timedelta(days=1)).isoformat(), (TODAY + timedelta(days=30)).isoformat()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with enroll_site(tmp_path) as s:
        yield s


def enrolled(site: dict[str, Any], unit: str = "setjen", room: str = "r1") -> dict[str, Any]:
    t = enroll.new_token(site["store"], unit, room, 3600, "operator")
    return enroll.redeem(site["store"], site["settings"], t["token"], "127.0.0.1")


def lend(store: SqliteStore, device: str, **changes: str | None) -> None:
    registry.update_loan(store, device, {"unit": "setjen", "room": "r1", **changes}, "operator", now_ts())


def audit_of(store: SqliteStore, action: str) -> list[tuple[str, dict[str, Any]]]:
    return [(r["actor"], json.loads(r["detail"])) for r in store.query(
        "SELECT actor, detail FROM audit WHERE action = ? ORDER BY id", (action,))]


def account(store: SqliteStore, agent: str = "room-1") -> dict[str, Any]:
    return store.query("SELECT * FROM agent_accounts WHERE agent = ?", (agent,))[0]


def test_the_last_loan_ending_disables_the_account_and_a_new_loan_enables_it(site: dict[str, Any]) -> None:
    store, broker = site["store"], site["broker"]
    cfg = enrolled(site)
    lend(store, SPK, lease_start=(TODAY - timedelta(days=40)).isoformat(), lease_end=YESTERDAY)
    agent = Client(broker.url, cfg["username"], cfg["password"])
    assert agent.connack.value == 0

    # one loan of the room ended yesterday, the camera's still runs: nothing changes
    assert leases.sweep(store) == {"out": 0, "return": 1}
    assert account(store)["disabled_at"] is None
    assert agent.publish("pantau/v1/agents/room-1/state", "still lent") in (0, 16)  # 16: no subscribers
    assert agent.disconnects == []

    # the camera comes back: the return's sweep ends the account at once
    leases.record_return(store, CAM, "operator")
    assert wait_for(lambda: agent.disconnects), "the broker kept the agent of an ended lease connected"
    agent.close()
    refused = Client(broker.url, cfg["username"], cfg["password"])
    assert refused.connack.value == 135  # not authorized
    refused.close()
    acct = account(store)
    assert (acct["disabled_by"], acct["disabled_reason"]) == ("collector", "lease ended")
    [(actor, detail)] = audit_of(store, "agent.disabled")
    assert actor == "collector" and detail["reason"] == "lease ended" and detail["broker_account"] is True
    assert detail["loans"] == sorted([CAM, SPK]) and detail["rooms"] == ["r1"]
    assert (broker.admin().client_info("room-1") or {}).get("disabled") is True

    # once: later sweeps change nothing
    assert leases.lease_accounts(store, site["settings"]) == {"disabled": [], "enabled": []}
    leases.sweep(store)
    assert len(audit_of(store, "agent.disabled")) == 1

    # a new loan of the room: the account is back, with the password the room PC still has
    lend(store, SPK, lease_start=TODAY.isoformat(), lease_end=NEXT_MONTH)
    assert leases.lease_accounts(store, site["settings"]) == {"disabled": [], "enabled": ["room-1"]}
    again = Client(broker.url, cfg["username"], cfg["password"])
    assert again.connack.value == 0
    assert again.publish("pantau/v1/agents/room-1/state", "lent again") in (0, 16)
    again.close()
    assert account(store)["disabled_at"] is None
    [(actor, detail)] = audit_of(store, "agent.enabled")
    assert actor == "collector" and detail["running"] == [SPK]

    # that loan ends too (its lease_end day is over): disabled again
    later = datetime.combine(TODAY + timedelta(days=31), datetime.min.time(), UTC) + timedelta(hours=9)
    assert leases.lease_accounts(store, site["settings"], later) == {"disabled": ["room-1"], "enabled": []}
    assert len(audit_of(store, "agent.disabled")) == 2


def test_an_enrollment_after_the_end_and_an_operators_disable_stand(site: dict[str, Any]) -> None:
    store, broker = site["store"], site["broker"]
    enrolled(site)
    leases.record_return(store, CAM, "operator")  # the room's only loan is over
    assert account(store)["disabled_reason"] == "lease ended"

    # central IT enrolls the PC again on purpose, with no loan yet: the sweep leaves it enabled
    cfg = enrolled(site)
    assert leases.lease_accounts(store, site["settings"]) == {"disabled": [], "enabled": []}
    leases.sweep(store)
    assert account(store)["disabled_at"] is None
    c = Client(broker.url, cfg["username"], cfg["password"])
    assert c.connack.value == 0
    c.close()

    # an operator disables it (PC replaced); a new loan does not undo that
    enroll.disable_agent(store, site["settings"], "room-1", "operator", "PC replaced")
    lend(store, SPK, lease_end=NEXT_MONTH)
    assert leases.lease_accounts(store, site["settings"]) == {"disabled": [], "enabled": []}
    assert account(store)["disabled_reason"] == "PC replaced"
    c = Client(broker.url, cfg["username"], cfg["password"])
    assert c.connack.value == 135
    c.close()


def test_rooms_without_loans_and_rooms_with_a_running_loan_keep_their_accounts(site: dict[str, Any]) -> None:
    store = site["store"]
    enrolled(site)  # room-1, r1: the camera's loan runs until 2027-01-04
    enrolled(site, "bpsdm", "aula")  # aula-bpsdm: a loan without an end
    with store.tx() as db:
        db.execute("DELETE FROM loans WHERE room = 'aula'")  # no loan at all: left alone
    far = datetime(2026, 12, 31, 12, tzinfo=UTC)
    assert leases.lease_accounts(store, site["settings"], far) == {"disabled": [], "enabled": []}
    assert [a["disabled_at"] for a in enroll.accounts(store)] == [None, None]


def test_an_unreachable_broker_changes_nothing_and_is_tried_again_later(site: dict[str, Any],
                                                                        caplog: Any) -> None:
    store = site["store"]
    enrolled(site)
    with store.tx() as db:
        db.execute("UPDATE loans SET returned_at = ? WHERE device = ?", (now_ts(), CAM))
    away = enroll.EnrollSettings(dynsec=DynsecAdmin(parse_broker(f"mqtt://127.0.0.1:{free_port()}"), ADMIN,
                                                    ADMIN_PW, timeout_s=2.0))
    with caplog.at_level(logging.WARNING, logger="collector.leases"):
        assert leases.sweep(store, settings=away) == {"out": 0, "return": 1}  # the snapshot is still taken
        assert leases.lease_accounts(store, away) == {"disabled": [], "enabled": []}  # backing off: not tried
    assert account(store)["disabled_at"] is None and audit_of(store, "agent.disabled") == []
    [rec] = [r for r in caplog.records if r.name == "collector.leases"]
    assert "broker accounts are not changed (the next try in 60 s): broker: cannot reach 127.0.0.1:" in rec.message
    # the real broker (another target) is reached at once
    assert leases.lease_accounts(store, site["settings"]) == {"disabled": ["room-1"], "enabled": []}
