"""The contract's generic search: searchtype=all|contain|single plus field filters."""
from __future__ import annotations

import pytest
import pytest_twisted

from core_testlib import POOLS, assert_error, snapshot, seed_pools
from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.paging import search_filter

NAMES = ["alpha", "Alpha-2", "beta", "gamma.1", "gammax1", "page"]


@pytest_twisted.async_fixture
async def seeded(api):
    await seed_pools(api.core, NAMES)
    await api.core.store.collection("resource_pools").update_one({"name": "beta"}, {"$set": {"status": 2}})
    return api


async def _names(api, **params) -> list[str]:
    status, body = await api.call("GET", POOLS, params=params)
    assert (status, body["code"]) == (200, 0), body
    return [p["name"] for p in body["data"]["results"]]


@pytest_twisted.ensureDeferred
async def test_all_without_filters_lists_everything(seeded):
    assert await _names(seeded, searchtype="all") == ["default", *NAMES]
    assert await _names(seeded) == ["default", *NAMES]


@pytest_twisted.ensureDeferred
async def test_all_filters_by_equality(seeded):
    assert await _names(seeded, searchtype="all", name="alpha") == ["alpha"]
    assert await _names(seeded, name="alpha") == ["alpha"]
    assert await _names(seeded, name="alph") == []
    assert await _names(seeded, status="2") == ["beta"]
    assert await _names(seeded, default="1") == ["default"]
    assert await _names(seeded, status="0", name="beta") == []


@pytest_twisted.ensureDeferred
async def test_contain_is_a_case_insensitive_substring(seeded):
    assert await _names(seeded, searchtype="contain", name="alpha") == ["alpha", "Alpha-2"]
    assert await _names(seeded, searchtype="contain", name="MM") == ["gamma.1", "gammax1"]


@pytest_twisted.ensureDeferred
async def test_contain_takes_the_value_literally(seeded):
    assert await _names(seeded, searchtype="contain", name="a.1") == ["gamma.1"]
    assert await _names(seeded, searchtype="contain", name=".*") == []
    assert await _names(seeded, searchtype="contain", name="%") == []


@pytest_twisted.ensureDeferred
async def test_contain_with_an_int_field_is_equality(seeded):
    assert await _names(seeded, searchtype="contain", status="2") == ["beta"]


@pytest_twisted.ensureDeferred
async def test_single_returns_one_record_not_a_page(seeded):
    status, body = await seeded.call("GET", POOLS, params={"searchtype": "single", "name": "beta"})
    assert (status, body["code"]) == (200, 0)
    record = body["data"]
    assert record["name"] == "beta" and "results" not in record and record["host_count"] == 0
    status, body = await seeded.call("GET", POOLS, params={"searchtype": "single", "status": "0"})
    assert body["data"]["name"] == "default"  # the first match


@pytest_twisted.ensureDeferred
async def test_single_without_a_match_is_404(seeded):
    status, body = await seeded.call("GET", POOLS, params={"searchtype": "single", "name": "nope"})
    assert_error(status, body, 404, errors.NOT_FOUND.code)
    assert "name=nope" in body["msg"]


@pytest.mark.parametrize("searchtype", ["contain", "single"])
@pytest_twisted.ensureDeferred
async def test_contain_and_single_need_a_filter(seeded, searchtype):
    status, body = await seeded.call("GET", POOLS, params={"searchtype": searchtype, "page": "1", "page_size": "5"})
    assert_error(status, body, 400, errors.SEARCH_NEEDS_FILTER.code)
    assert searchtype in body["msg"]


@pytest_twisted.ensureDeferred
async def test_paging_parameters_are_never_filters(seeded):
    """A pool named "page" exists; ?page=1 still means the first page, not name filtering."""
    assert await _names(seeded, page="1", page_size="3") == ["default", "alpha", "Alpha-2"]
    assert await _names(seeded, searchtype="contain", name="page", page="1", page_size="3") == ["page"]
    status, body = await seeded.call("GET", POOLS, params={"searchtype": "all", "page": "2", "page_size": "3"})
    assert body["data"]["count"] == len(NAMES) + 1


@pytest.mark.parametrize("field", ["nme", "password_hash", "id", "host_count", "doc", "$where"])
@pytest_twisted.ensureDeferred
async def test_unknown_fields_are_rejected(seeded, field):
    before = await snapshot(seeded.core)
    status, body = await seeded.call("GET", POOLS, params={field: "x"}, headers={"Accept-Language": "en"})
    assert_error(status, body, 400, errors.UNKNOWN_FILTER.code)
    assert body["msg"] == f"unknown query field: {field}"
    assert "name" in body["data"]["fields"]
    assert await snapshot(seeded.core) == before


@pytest.mark.parametrize(
    "params, field",
    [
        ({"status": "abc"}, "status"),
        ({"default": "yes"}, "default"),
        ({"status": "1.0"}, "status"),
        ({"status": str(2**63)}, "status"),
        ({"searchtype": "regex", "name": "a"}, "searchtype"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_values_are_400_naming_the_field(seeded, params, field):
    status, body = await seeded.call("GET", POOLS, params=params, headers={"Accept-Language": "en"})
    assert_error(status, body, 400, errors.INVALID_PARAM.code)
    assert body["msg"].startswith(f"invalid parameter {field}:")


FIELDS = {"name": str, "count": int, "enabled": bool}


@pytest.mark.parametrize(
    "raw, value",
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), (" false ", False), ("0", False), ("no", False)],
)
def test_bool_coercion(raw, value):
    assert search_filter({"enabled": raw}, FIELDS) == ("all", {"enabled": value})


@pytest.mark.parametrize("raw", ["", "maybe", "2", "on"])
def test_bool_coercion_errors(raw):
    with pytest.raises(ApiError) as raised:
        search_filter({"enabled": raw}, FIELDS)
    assert raised.value.error is errors.INVALID_PARAM and raised.value.params["field"] == "enabled"


@pytest.mark.parametrize("raw", ["", "x", "1e3", "0x10", str(-(2**63) - 1), str(2**63)])
def test_int_coercion_errors(raw):
    with pytest.raises(ApiError) as raised:
        search_filter({"count": raw}, FIELDS)
    assert raised.value.error is errors.INVALID_PARAM and raised.value.params["field"] == "count"


def test_int_coercion_and_64_bit_bounds():
    assert search_filter({"count": "-7"}, FIELDS) == ("all", {"count": -7})
    assert search_filter({"count": str(2**63 - 1)}, FIELDS) == ("all", {"count": 2**63 - 1})


def test_fixed_conditions_are_combined_with_the_filters():
    assert search_filter({}, FIELDS, {"pool": "p"}) == ("all", {"pool": "p"})
    searchtype, conditions = search_filter({"searchtype": "contain", "name": "a+b"}, FIELDS, {"pool": "p"})
    assert searchtype == "contain"
    assert conditions == {"$and": [{"pool": "p"}, {"name": {"$regex": r"a\+b", "$options": "i"}}]}


def test_reserved_parameters_are_not_filters():
    assert search_filter({"page": "2", "page_size": "5", "searchtype": "all"}, FIELDS) == ("all", {})
