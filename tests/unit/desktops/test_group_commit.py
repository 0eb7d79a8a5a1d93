"""Group commit: the first write goes alone, what arrives meanwhile goes in one batch, results and
failures reach the right callers, and a failed batch does not stop the next."""
from __future__ import annotations

from twisted.internet import defer

from kvmdesk.plugins.desktops.group_commit import GroupCommit


def test_batches_results_and_failures():
    batches: list[list[int]] = []
    pending: list[defer.Deferred] = []

    def write(items: list[int]) -> defer.Deferred:
        batches.append(items)
        pending.append(defer.Deferred())
        return pending[-1]

    commit = GroupCommit(write)
    results: dict[int, object] = {}
    for n in range(4):
        commit.submit(n).addBoth(lambda r, n=n: results.__setitem__(n, r))
    assert batches == [[0]]  # the first goes at once; 1-3 wait for it
    pending[0].callback(["r0"])
    assert results == {0: "r0"} and batches == [[0], [1, 2, 3]]
    commit.submit(4).addBoth(lambda r: results.__setitem__(4, r))
    pending[1].errback(RuntimeError("store down"))
    assert all(results[n].check(RuntimeError) for n in (1, 2, 3))
    assert batches[-1] == [4]  # the next batch runs after a failed one
    pending[2].callback(["r4"])
    assert results[4] == "r4"
    commit.submit(5).addBoth(lambda r: results.__setitem__(5, r))
    assert batches[-1] == [5]  # idle again: the next write goes at once
    pending[3].callback(["r5"])
    assert results[5] == "r5"
