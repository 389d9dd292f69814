"""Sign-in limits hold under parallel guessing, and bogus one-time links block only their sender. On both
stores."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from collector import users
from tests.web_helpers import Site


@pytest.fixture
def site(site_on_each_store: Site) -> Site:
    return site_on_each_store  # (conftest): every test here on both stores


def _login(site: Any, body: dict[str, Any], forwarded: str | None = None) -> int:
    headers = {"Origin": site.url.rstrip("/")}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    return httpx.post(site.url.rstrip("/") + "/api/login", json=body, headers=headers, timeout=30).status_code


def test_parallel_guesses_get_no_more_checks_than_the_limit(site: Site) -> None:
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: _login(site, {"username": "dewi", "password": f"wrong-{i}"},
                                               f"10.9.0.{i}"), range(24)))
    assert codes.count(401) <= users.MAX_FAILS_PER_USER and codes.count(429) >= 24 - users.MAX_FAILS_PER_USER


def test_bogus_one_time_links_block_only_their_sender(site: Site) -> None:
    for i in range(users.MAX_FAILS_PER_USER + 1):
        _login(site, {"once": f"po_bogus{i}"}, "10.0.0.6")
    assert _login(site, {"once": "po_bogus-more"}, "10.0.0.6") == 429
    link = users.new_token(site.store, "ani", "test", "test", kind="once")
    assert _login(site, {"once": link}, "10.0.0.7") == 200  # another address's link still works
