"""A PIC sees only their unit's rows, also where a request names another unit's room PC or device. On both
stores."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.builder import CAM, Agent, device, feed
from tests.web_helpers import SPK_B, Site, token_for


@pytest.fixture
def site(site_on_each_store: Site) -> Site:
    return site_on_each_store  # (conftest): every test here on both stores


def _get(site: Any, token: str, path: str) -> httpx.Response:
    return httpx.get(site.url.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_a_pic_naming_another_units_pc_or_device_gets_nothing_of_it(site: Site) -> None:
    stray = device("1111:2222@1-3", "camera", "1-3", serial=None)  # registered nowhere, seen only at bpsdm
    aula = Agent("aula-bpsdm", "bootbbbb0002").started(devices=[SPK_B, stray])
    aula.error(40, stray, "video.stream_error")
    feed(site.collector, aula)
    assert site.store.query("SELECT count(*) AS n FROM incidents WHERE device = ?", (stray["key"],))[0]["n"] == 1
    budi = token_for(site.store, "budi-pic", "pic", "setjen")
    # a device seen only at bpsdm's PC, named with the PIC's own PC: nothing of it (not its serial, product, port)
    for key in (stray["key"], SPK_B["key"]):
        for path in (f"/api/devices/{quote(key, safe='')}?agent=room-1",
                     f"/api/devices/{quote(key, safe='')}/history?agent=room-1"):
            r = _get(site, budi, path)
            assert r.status_code == 404 and "aula-bpsdm" not in r.text and "product" not in r.text, (path, r.text)
    citra = token_for(site.store, "citra-pic", "pic", "bpsdm")
    # anyone naming a PC that neither saw a device nor has it lent, or a device nobody saw: 404
    ani = token_for(site.store, "ani-op", "operator")
    assert _get(site, ani, "/api/devices/nope?agent=room-1").status_code == 404
    assert _get(site, ani, f"/api/devices/{quote(CAM['key'], safe='')}/history?agent=nope").status_code == 404
    assert _get(site, ani, f"/api/devices/{quote(SPK_B['key'], safe='')}?agent=room-1").status_code == 404
    assert _get(site, ani, f"/api/devices/{quote(SPK_B['key'], safe='')}?agent=aula-bpsdm").status_code == 200
    # a device its PC only ever listed (attached since that PC started: inventory, no event) is that PC's
    listed = device("2222:3333:INV1", "camera", "1-7")
    feed(site.collector, Agent("room-inv", "bootinv00001").started(devices=[listed]))
    for path in ("", "/history"):
        r = _get(site, ani, f"/api/devices/{quote(listed['key'], safe='')}{path}?agent=room-inv")
        assert r.status_code == 200, (path, r.text)
    assert _get(site, ani, f"/api/devices/{quote(listed['key'], safe='')}?agent=room-inv").json()["info"]["port"] == \
        "1-7"
    # naming the other unit's PC is refused outright
    assert _get(site, budi, f"/api/devices/{quote(SPK_B['key'], safe='')}?agent=aula-bpsdm").status_code == 404
    assert _get(site, citra, f"/api/devices/{quote(CAM['key'], safe='')}?agent=room-1").status_code == 404
    # their own PC's page lists only their unit's incidents
    r = _get(site, citra, "/api/fleet/aula-bpsdm")
    assert r.status_code == 200 and all(i["unit"] == "bpsdm" for i in r.json()["incidents"])
    assert _get(site, citra, "/api/fleet/room-1").status_code == 404


def test_an_open_change_feed_ends_when_its_account_is_disabled(site: Site) -> None:
    import threading
    import time

    from collector import users

    dewi = token_for(site.store, "dewi-feed", "viewer")
    lines: list[str] = []
    ended = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", site.url.rstrip("/") + "/api/events", timeout=30,
                          headers={"Authorization": f"Bearer {dewi}"}) as r:
            for line in r.iter_lines():
                lines.append(line)
        ended.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while ": ready" not in lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ": ready" in lines
    users.disable(site.store, "dewi-feed", "test")
    t0 = time.monotonic()
    assert ended.wait(10), "the feed went on for a disabled account"
    print(f"feed ended {time.monotonic() - t0:.1f} s after the account was disabled")
