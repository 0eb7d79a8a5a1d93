"""run_batch: per-item results as the contract asks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError
from kvmdesk.core.jobs import run_batch


def _req(lang: str = "zh") -> SimpleNamespace:
    return SimpleNamespace(request_id="abcdef012345", lang=lang)


async def _operation(item):
    name = item["name"] if isinstance(item, dict) else item
    if name.startswith("missing"):
        raise ApiError(errors.NOT_FOUND, resource="资源池", key=name)
    if name.startswith("busy"):
        raise ApiError(errors.IN_USE, resource="资源池", reason="nodes")
    if name.startswith("crash"):
        raise RuntimeError("unexpected")
    return name


@pytest_twisted.ensureDeferred
async def test_all_succeed():
    assert await run_batch(_req(), ["a", "b"], _operation) == {"success_num": 2, "failed_num": 0, "failures": []}


@pytest_twisted.ensureDeferred
async def test_one_item_succeeds():
    assert await run_batch(_req(), ["a"], _operation) == {"success_num": 1, "failed_num": 0, "failures": []}


@pytest_twisted.ensureDeferred
async def test_one_item_fails_with_its_own_error():
    with pytest.raises(ApiError) as raised:
        await run_batch(_req(), ["missing-1"], _operation)
    assert raised.value.error is errors.NOT_FOUND and raised.value.message() == "资源池不存在: missing-1"


@pytest_twisted.ensureDeferred
async def test_one_item_crashes_as_an_internal_error():
    with pytest.raises(ApiError) as raised:
        await run_batch(_req(), ["crash"], _operation)
    assert raised.value.error is errors.INTERNAL_ERROR and "abcdef012345" in raised.value.message()


@pytest_twisted.ensureDeferred
async def test_several_items_report_counts_and_failures():
    items = ["a", "missing-1", {"uuid": "u-2", "name": "busy-2"}, "crash", "b"]
    result = await run_batch(_req("en"), items, _operation)
    assert (result["success_num"], result["failed_num"]) == (2, 3)
    assert result["failures"] == [
        {"uuid": "missing-1", "code": errors.NOT_FOUND.code, "msg": "资源池 not found: missing-1"},
        {"uuid": "u-2", "name": "busy-2", "code": errors.IN_USE.code,
         "msg": "资源池 is in use and cannot be deleted: nodes"},
        {"uuid": "crash", "code": errors.INTERNAL_ERROR.code, "msg": "internal error, request id abcdef012345"},
    ]


@pytest_twisted.ensureDeferred
async def test_no_items():
    with pytest.raises(ApiError) as raised:
        await run_batch(_req(), [], _operation)
    assert raised.value.error is errors.BATCH_EMPTY


@pytest.mark.parametrize("concurrency, expected_peak", [(1, 1), (3, 3), (0, 1)])
@pytest_twisted.ensureDeferred
async def test_concurrency_is_bounded(concurrency, expected_peak):
    gates = [defer.Deferred() for _ in range(6)]
    running, peak = [0], [0]

    async def slow(index):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await gates[index]
        running[0] -= 1

    batch = defer.ensureDeferred(run_batch(_req(), list(range(6)), slow, concurrency=concurrency))
    for gate in gates:
        gate.callback(None)
    result = await batch
    assert result["success_num"] == 6 and peak[0] == expected_peak
