"""A PIC sees only their unit's rows, also where a request names another unit's room PC or device. On both
stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.builder import CAM, Agent, device, feed
from tests.web_helpers import SPK_B, Site, token_for


@pytest.fixture
def site(tmp_path: Path, store_db: str) -> Iterator[Site]:
    """The dashboard's site (``tests.web_helpers.Site``) on each store."""
    s = Site(tmp_path, store_db)
    yield s
    s.web.stop()
    s.store.close()


def _get(site: Any, token: str, path: str) -> httpx.Response:
    return httpx.get(site.url.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_a_pic_naming_another_units_pc_or_device_gets_nothing_of_it(site: Site) -> None:
    stray = device("1111:2222@1-3", "camera", "1-3", serial=None)  # registered nowhere, seen only at bpsdm
    aula = Agent("aula-bpsdm", "bootbbbb0002").started(devices=[SPK_B, stray])
    aula.error(40, stray, "video.stream_error")
    feed(site.collector, aula)
    assert site.store.query("SELECT count(*) AS n FROM incidents WHERE device = ?", (stray["key"],))[0]["n"] == 1
    budi = token_for(site.store, "budi-pic", "pic", "setjen")
    r = _get(site, budi, f"/api/devices/{quote(stray['key'], safe='')}?agent=room-1")
    assert "aula-bpsdm" not in r.text and all(i.get("unit") == "setjen" for i in r.json().get("incidents", []))
    citra = token_for(site.store, "citra-pic", "pic", "bpsdm")
    # bpsdm's speakerphone, seen only at bpsdm's PC: a setjen PIC naming their own PC learns nothing of it
    r = _get(site, budi, f"/api/devices/{quote(SPK_B['key'], safe='')}?agent=room-1")
    assert r.status_code == 404 or all(i.get("unit") == "setjen" for i in r.json().get("incidents", []))
    assert "aula-bpsdm" not in r.text
    # naming the other unit's PC is refused outright
    assert _get(site, budi, f"/api/devices/{quote(SPK_B['key'], safe='')}?agent=aula-bpsdm").status_code == 404
    assert _get(site, citra, f"/api/devices/{quote(CAM['key'], safe='')}?agent=room-1").status_code == 404
    # their own PC's page lists only their unit's incidents
    r = _get(site, citra, "/api/fleet/aula-bpsdm")
    assert r.status_code == 200 and all(i["unit"] == "bpsdm" for i in r.json()["incidents"])
    assert _get(site, citra, "/api/fleet/room-1").status_code == 404
