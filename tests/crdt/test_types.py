"""Semantics and lattice laws of the pure CRDT types."""

from __future__ import annotations

from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.counter import PNCounter
from crdt.hlc import Timestamp
from crdt.lww import LwwMap
from crdt.orset import DotContext, ORSet
from peerd.errors import ProtocolError
from peerd.wire import decode_untrusted, encode

from .strategies import ANY_DELTAS, REPLICAS

A, B, C = REPLICAS
EMPTY = {LwwMap: LwwMap, ORSet: ORSet, PNCounter: PNCounter}


def join_all(deltas: list[Any], start: Any) -> Any:
    return reduce(lambda acc, d: acc.join(d), deltas, start)


@st.composite
def three_states(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    """Three replicas' states: joins of random subsets of one shared history."""
    deltas = draw(ANY_DELTAS)
    empty = deltas[0].__class__() if deltas else ORSet()
    out = []
    for _ in range(3):
        subset = [d for d in deltas if draw(st.booleans())]
        out.append(join_all(subset, empty))
    return out[0], out[1], out[2]


@settings(max_examples=60, deadline=None)
@given(three_states())
def test_merge_is_commutative_associative_idempotent(states: tuple[Any, Any, Any]) -> None:
    a, b, c = states
    assert a.join(b) == b.join(a)
    assert a.join(b).join(c) == a.join(b.join(c))
    assert a.join(a) == a
    assert a.join(b).join(b) == a.join(b)


@settings(max_examples=60, deadline=None)
@given(ANY_DELTAS, st.data())
def test_any_order_and_duplication_of_deltas_converges(
    deltas: list[Any], data: st.DataObject
) -> None:
    if not deltas:
        return
    empty = deltas[0].__class__()
    in_order = join_all(deltas, empty)
    shuffled = data.draw(st.permutations(deltas + data.draw(st.lists(st.sampled_from(deltas)))))
    state = empty
    for d in shuffled:
        state.merge(d)  # in place, as the store does
    assert state == in_order


@settings(max_examples=60, deadline=None)
@given(three_states())
def test_wire_roundtrip_is_exact(states: tuple[Any, Any, Any]) -> None:
    state = states[0].join(states[1])
    body = encode(state.to_wire())
    decoded = type(state).from_wire(decode_untrusted(body, expect=type(state.to_wire())))
    assert decoded == state
    assert encode(decoded.to_wire()) == body  # canonical: equal state, equal bytes


@settings(max_examples=150, deadline=None)
@given(three_states(), st.data())
def test_corrupted_wire_input_raises_only_protocol_error(
    states: tuple[Any, Any, Any], data: st.DataObject
) -> None:
    state = states[0]
    body = bytearray(encode(state.to_wire()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    try:
        decoded = type(state).from_wire(decode_untrusted(bytes(body), expect=type(state.to_wire())))
    except ProtocolError:
        return
    assert isinstance(decoded, type(state))


def ts(ms: int, logical: int = 0, node: bytes = A) -> Timestamp:
    return Timestamp(ms, logical, node)


def test_lww_later_write_wins_and_ties_break_by_peer() -> None:
    m = LwwMap()
    m.merge(LwwMap.set_delta("lr", 0.1, ts(10)))
    m.merge(LwwMap.set_delta("lr", 0.2, ts(9)))
    assert m.get("lr") == 0.1
    m.merge(LwwMap.set_delta("lr", 0.3, ts(10, node=B)))  # same time, greater peer id
    assert m.get("lr") == 0.3
    m.merge(LwwMap.delete_delta("lr", ts(11)))
    assert "lr" not in m and m.get("lr", "gone") == "gone"
    m.merge(LwwMap.set_delta("lr", 0.4, ts(10, 5)))  # older than the tombstone
    assert "lr" not in m


def test_lww_equal_timestamps_with_different_values_still_commute() -> None:
    # Only a misbehaving author can produce this; merge must stay deterministic.
    x = LwwMap.set_delta("k", "x", ts(5))
    y = LwwMap.set_delta("k", "y", ts(5))
    assert x.join(y) == y.join(x)
    assert x.join(y).get("k") == "y"


def test_lww_values_are_normalised_and_checked() -> None:
    m = LwwMap.set_delta("k", (1, 2, {"a": (3,)}), ts(1))
    assert m.get("k") == [1, 2, {"a": [3]}]
    with pytest.raises(ValueError):
        LwwMap.set_delta("k", object(), ts(1))
    with pytest.raises(ValueError):
        LwwMap.set_delta("", 1, ts(1))
    with pytest.raises(ValueError):
        LwwMap.set_delta("k", b"x" * 70_000, ts(1))


def test_orset_add_wins_over_concurrent_remove() -> None:
    a, b = ORSet(), ORSet()
    add = a.add_delta("peer1", A)
    a.merge(add)
    b.merge(add)
    remove = b.remove_delta("peer1")  # b removes what it saw...
    b.merge(remove)
    readd = a.add_delta("peer1", A)  # ...while a concurrently re-adds
    a.merge(readd)
    a.merge(remove)
    b.merge(readd)
    assert a == b
    assert "peer1" in a


def test_orset_remove_then_readd_and_context_compacts() -> None:
    s = ORSet()
    for _ in range(3):
        s.merge(s.add_delta("x", A))
        s.merge(s.remove_delta("x"))
    assert "x" not in s and len(s) == 0
    assert s.ctx.vv == {A: 3} and not s.ctx.cloud  # no per-element tombstones left
    with pytest.raises(ValueError):
        s.add_delta(True, A)  # bool would alias 1


def test_counter_value_and_merge() -> None:
    c = PNCounter()
    c.merge(c.increment_delta(A, 5))
    c.merge(c.increment_delta(A, -2))
    other = PNCounter()
    other.merge(other.increment_delta(B, 10))
    joined = c.join(other)
    assert joined.value() == 13
    stale = PNCounter({A: 1})
    assert not joined.merge(stale)  # an older total changes nothing
    with pytest.raises(ValueError):
        c.increment_delta(A, 2**63)


def test_orset_encoding_is_independent_of_insertion_order() -> None:
    # Set iteration order varies with the hash seed; the peer table must not follow it.
    dots = [(r, 1) for r in REPLICAS]
    for perm in ([A, B, C], [C, A, B], [B, C, A]):
        state = ORSet({"x": frozenset((r, 1) for r in perm)}, DotContext(cloud=dots))
        msg = state.to_wire()
        assert list(msg.peers) == sorted(REPLICAS)
        assert msg.entries[0].dots == ((0, 1), (1, 1), (2, 1))
