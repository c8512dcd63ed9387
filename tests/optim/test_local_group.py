"""LocalGroup: deterministic reduction, failure semantics, joins at round boundaries,
popular-state sync."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from collectives.api import SyncStrategy
from collectives.local import LocalGroup
from collectives.local_ops import LocalArrays, popular_state
from optim.harness import run_threads
from peerd.errors import ConfigError, PeerLost


def test_all_reduce_is_identical_on_every_member_and_reports_bytes() -> None:
    group = LocalGroup(3)
    vals = [np.array([0.1, 1e8, -3.0], np.float32) * (i + 1) for i in range(3)]

    def member(i: int) -> tuple[np.ndarray, int, tuple[str, ...]]:
        arr = vals[i].copy()
        res = group.member(i).all_reduce(arr, "avg")
        return arr, res.bytes_sent, res.participants

    out = run_threads(3, member)
    expect = ((vals[0] + vals[1]) + vals[2]) / np.float32(3)
    for arr, sent, parts in out:
        assert arr.tobytes() == expect.tobytes()
        assert sent == round(2 * 2 / 3 * 3 * 4) and parts == ("m0", "m1", "m2")


@pytest.mark.parametrize("retry", [True, False])
def test_member_death_mid_round(retry: bool) -> None:
    group = LocalGroup(3, timeout=20)
    arrived = threading.Barrier(2)

    def member(i: int) -> object:
        coll = group.member(i)
        arr = torch.full((4,), float(i + 1))
        if i == 2:
            arrived.wait()
            group.kill(2)
            with pytest.raises(PeerLost):
                coll.all_reduce(arr)
            return None
        handle = coll.all_reduce_async(arr, retry=retry)
        if i == 0:
            arrived.wait()
        try:
            res = handle.wait()
        except PeerLost as exc:
            return ("lost", exc.peers, arr.tolist())
        return ("ok", res.participants, arr.tolist(), res.attempts)

    out = run_threads(3, member)
    if retry:
        assert out[0] == out[1] == ("ok", ("m0", "m1"), [1.5] * 4, 2)
    else:
        assert out[0][:2] == out[1][:2] == ("lost", ("m2",))
        assert out[0][2] == [1.0] * 4 and out[1][2] == [2.0] * 4  # inputs untouched
    assert group.members() == ("m0", "m1")


def test_joiner_is_admitted_at_the_next_sync_and_receives_the_popular_state() -> None:
    group = LocalGroup(2, timeout=20)
    j = group.add_member()
    joined = threading.Event()

    def member(i: int) -> tuple[list[float], tuple[str, ...], int]:
        coll = group.member(i)
        state = {"w": torch.full((3,), 7.0 if i < 2 else -1.0)}
        if i == j:
            coll.sync_state(state, 0, strategy=SyncStrategy.RECEIVE_ONLY)
            joined.set()
        else:
            r = coll.all_reduce(torch.ones(2))  # the joiner is not part of this round
            assert r.participants == ("m0", "m1")
            group.wait_for_joiners(1)
            coll.sync_state(state, 5)
        arr = torch.tensor([float(i)])
        after = coll.all_reduce(arr, "sum")
        return state["w"].tolist(), after.participants, int(arr.item())

    out = run_threads(3, member)
    assert all(o == ([7.0] * 3, ("m0", "m1", "m2"), 3) for o in out)
    assert joined.is_set()


def test_update_view_is_a_boundary_that_admits_a_joiner_calling_it() -> None:
    """A custom loop of all-reduces with ``update_view`` between them, as on a
    daemon: the joiner's ``update_view`` returns once a boundary admits it,
    and from the next all-reduce on it takes part."""
    group = LocalGroup(2, timeout=20)
    j = group.add_member()
    passed = threading.Event()  # the members' first boundary is behind them

    def member(i: int) -> tuple[tuple[str, ...], tuple[str, ...], int, float]:
        coll = group.member(i)
        if i == j:
            assert passed.wait(20)
            first = coll.update_view()
        else:
            r = coll.all_reduce(torch.ones(2))  # the joiner is not part of this round
            assert r.participants == ("m0", "m1")
            assert coll.update_view().members == ("m0", "m1")  # a boundary with nobody new
            passed.set()
            group.wait_for_joiners(1)
            first = coll.update_view()
        arr = torch.tensor([float(i)])
        after = coll.all_reduce(arr, "sum")
        return first.members, after.participants, first.revision, arr.item()

    out = run_threads(3, member)
    assert all(o == (("m0", "m1", "m2"), ("m0", "m1", "m2"), 2, 3.0) for o in out), out
    assert group.members() == ("m0", "m1", "m2")


def test_a_joiner_must_come_in_at_a_boundary() -> None:
    group = LocalGroup(1, timeout=5)
    coll = group.member(group.add_member())
    with pytest.raises(ConfigError, match="sync_state or update_view first"):
        coll.all_reduce(torch.ones(2))


def test_popular_state_majority_then_revision_then_digest() -> None:
    def arrays(v: float) -> LocalArrays:
        return LocalArrays.capture({"x": np.array([v], np.float32)})

    a, b = arrays(1.0), arrays(2.0)
    E = SyncStrategy.ENFORCE_POPULAR
    win, holders = popular_state({"p": (3, E, a, b"a"), "q": (3, E, b, b"b"), "r": (3, E, b, b"b")})
    assert holders == ["q", "r"]
    win, holders = popular_state({"p": (4, E, a, b"a"), "q": (3, E, b, b"b")})
    assert holders == ["p"]
    R = SyncStrategy.RECEIVE_ONLY
    win, holders = popular_state({"p": (1, R, a, b"a")})
    assert win is None and holders == []
