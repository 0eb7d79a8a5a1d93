"""Paging: page/page_size validation, the maximum page size, full-URL next/previous links, last page."""
from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted

from core_testlib import POOLS, assert_error, running_api, seed_pools
from kvmdesk.core import errors
from kvmdesk.core.config import Config
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import page_envelope, page_of

BASE_URL = "http://kvmdesk.test/api/v1.0" + POOLS
TOTAL = 26  # the default pool and 25 seeded ones


@pytest_twisted.async_fixture
async def seeded(api):
    await seed_pools(api.core, [f"pool-{i:02d}" for i in range(1, 26)])
    return api


def _query(url: str) -> dict[str, list[str]]:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == BASE_URL, url
    return parse_qs(parts.query)


@pytest_twisted.ensureDeferred
async def test_first_page_with_the_default_size(seeded):
    api = seeded
    status, body = await api.call("GET", POOLS)
    page = body["data"]
    assert (status, page["count"], len(page["results"])) == (200, TOTAL, 10)
    assert page["previous"] is None
    assert page["next"] == BASE_URL + "?page=2&page_size=10"
    assert [p["name"] for p in page["results"]][:2] == ["default", "pool-01"]


@pytest_twisted.ensureDeferred
async def test_middle_and_last_pages(seeded):
    api = seeded
    _, body = await api.call("GET", POOLS, params={"page": 2, "page_size": 10})
    assert body["data"]["previous"] == BASE_URL + "?page=1&page_size=10"
    assert body["data"]["next"] == BASE_URL + "?page=3&page_size=10"
    _, body = await api.call("GET", POOLS, params={"page": 3, "page_size": 10})
    last = body["data"]
    assert (last["count"], len(last["results"]), last["next"]) == (TOTAL, 6, None)
    assert last["previous"] == BASE_URL + "?page=2&page_size=10"
    assert last["results"][-1]["name"] == "pool-25"


@pytest_twisted.ensureDeferred
async def test_exactly_full_last_page_has_no_next(seeded):
    api = seeded
    _, body = await api.call("GET", POOLS, params={"page": 2, "page_size": 13})
    assert (len(body["data"]["results"]), body["data"]["next"]) == (13, None)


@pytest_twisted.ensureDeferred
async def test_page_past_the_end_is_empty(seeded):
    api = seeded
    _, body = await api.call("GET", POOLS, params={"page": 9, "page_size": 10})
    assert (body["data"]["count"], body["data"]["results"], body["data"]["next"]) == (TOTAL, [], None)
    assert body["data"]["previous"] == BASE_URL + "?page=8&page_size=10"


@pytest_twisted.ensureDeferred
async def test_following_next_visits_every_record_once(seeded):
    api = seeded
    seen, url, pages = [], BASE_URL + "?page_size=7", 0
    while url:
        params = {k: v[-1] for k, v in _query(url).items()}
        status, body = await api.call("GET", POOLS, params=params)
        assert status == 200
        seen += [p["uuid"] for p in body["data"]["results"]]
        url, pages = body["data"]["next"], pages + 1
    assert (len(seen), len(set(seen)), pages) == (TOTAL, TOTAL, 4)


@pytest_twisted.ensureDeferred
async def test_links_keep_the_search_parameters(seeded):
    api = seeded
    _, body = await api.call("GET", POOLS, params={"searchtype": "contain", "name": "pool-1", "page_size": 5})
    page = body["data"]
    assert page["count"] == 10
    assert _query(page["next"]) == {"searchtype": ["contain"], "name": ["pool-1"], "page_size": ["5"], "page": ["2"]}


@pytest_twisted.ensureDeferred
async def test_links_use_the_host_header(seeded):
    api = seeded
    _, body = await api.call("GET", POOLS, headers={"Host": "10.0.0.5:50004"})
    assert body["data"]["next"] == "http://10.0.0.5:50004/api/v1.0/resource_mgr/resource_pools?page=2&page_size=10"


@pytest_twisted.ensureDeferred
async def test_links_quote_the_search_text_and_keep_its_place(seeded):
    api = seeded
    await seed_pools(api.core, [f"课室 a&b {i}" for i in range(3)])
    params = {"searchtype": "contain", "name": "课室 a&b", "page_size": "1", "page": "2"}
    _, body = await api.call("GET", POOLS, params=params)
    page = body["data"]
    assert page["count"] == 3
    quoted = "searchtype=contain&name=%E8%AF%BE%E5%AE%A4+a%26b&page_size=1"
    assert page["next"] == f"{BASE_URL}?{quoted}&page=3"
    assert page["previous"] == f"{BASE_URL}?{quoted}&page=1"


@pytest.mark.parametrize(
    "params, field",
    [
        ({"page": "0"}, "page"),
        ({"page": "-1"}, "page"),
        ({"page": "abc"}, "page"),
        ({"page": "1.5"}, "page"),
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "ten"}, "page_size"),
        ({"page_size": "1001"}, "page_size"),
        ({"page_size": "99999999999999999999999"}, "page_size"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_paging_parameters(api, params, field):
    status, body = await api.call("GET", POOLS, params=params, headers={"Accept-Language": "en"})
    assert_error(status, body, 400, errors.INVALID_PARAM.code)
    assert field in body["msg"]


@pytest_twisted.ensureDeferred
async def test_huge_page_number_is_an_empty_page_not_a_500(api):
    status, body = await api.call("GET", POOLS, params={"page": str(10**20), "page_size": "10"})
    assert status == 200
    assert (body["data"]["count"], body["data"]["results"], body["data"]["next"]) == (1, [], None)


@pytest_twisted.ensureDeferred
async def test_maximum_page_size_is_accepted_and_configurable(tmp_path, clock):
    async with running_api(tmp_path, clock, config={"api": {"max_page_size": 5, "default_page_size": 2}}) as api:
        await seed_pools(api.core, ["a", "b", "c", "d", "e", "f"])
        _, body = await api.call("GET", POOLS)
        assert len(body["data"]["results"]) == 2
        _, body = await api.call("GET", POOLS, params={"page_size": "5"})
        assert len(body["data"]["results"]) == 5
        status, body = await api.call("GET", POOLS, params={"page_size": "6"}, headers={"Accept-Language": "en"})
        assert_error(status, body, 400, errors.INVALID_PARAM.code)
        assert "at most 5" in body["msg"]


def _request(args: dict) -> SimpleNamespace:
    """The little of an ApiRequest that page_of/page_envelope use."""
    return SimpleNamespace(
        args=args,
        core=SimpleNamespace(config=Config()),
        url_with=lambda **p: "u?" + "&".join(f"{k}={v}" for k, v in {**args, **p}.items()),
    )


def test_page_of_a_list_in_memory():
    items = list(range(23))
    page = page_of(_request({"page": "3", "page_size": "10"}), items)
    assert page == {"count": 23, "next": None, "previous": "u?page=2&page_size=10", "results": [20, 21, 22]}
    first = page_of(_request({}), items)
    assert (first["results"], first["next"], first["previous"]) == (list(range(10)), "u?page=2&page_size=10", None)
    with pytest.raises(ApiError) as raised:
        page_of(_request({"page_size": "5000"}), items)
    assert raised.value.params["field"] == "page_size"


def test_page_envelope_of_an_empty_result():
    assert page_envelope(_request({}), 0, 1, 10, []) == {"count": 0, "next": None, "previous": None, "results": []}
