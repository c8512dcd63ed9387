"""Hypothesis strategies producing reachable CRDT histories (shared by the tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from crdt.counter import PNCounter
from crdt.hlc import HybridClock
from crdt.lww import LwwMap
from crdt.orset import ORSet

REPLICAS = [bytes([i + 1]) * 32 for i in range(3)]
ELEMENTS: st.SearchStrategy[str | int | bytes] = st.sampled_from(["a", "b", 7, b"c", ""])
KEYS = st.sampled_from(["lr", "batch", "model/name", "x"])
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)


@st.composite
def orset_deltas(draw: st.DrawFn) -> list[ORSet]:
    """Deltas of three replicas doing adds, removes and occasional full syncs."""
    states = {r: ORSet() for r in REPLICAS}
    deltas: list[ORSet] = []
    for _ in range(draw(st.integers(0, 20))):
        r = draw(st.sampled_from(REPLICAS))
        action = draw(st.sampled_from(["add", "add", "remove", "sync"]))
        if action == "sync":
            states[r].merge(states[draw(st.sampled_from(REPLICAS))])
            continue
        element = draw(ELEMENTS)
        if action == "add":
            delta = states[r].add_delta(element, r)
        else:
            delta = states[r].remove_delta(element)
        states[r].merge(delta)
        deltas.append(delta)
    return deltas


@st.composite
def lww_deltas(draw: st.DrawFn) -> list[LwwMap]:
    clocks = {r: HybridClock(r) for r in REPLICAS}
    deltas: list[LwwMap] = []
    now = 1_000
    for _ in range(draw(st.integers(0, 20))):
        now += draw(st.integers(-5, 5))  # clocks may step backwards; HLC copes
        r = draw(st.sampled_from(REPLICAS))
        ts = clocks[r].tick(max(now, 0))
        key = draw(KEYS)
        if draw(st.booleans()):
            deltas.append(LwwMap.set_delta(key, draw(VALUES), ts))
        else:
            deltas.append(LwwMap.delete_delta(key, ts))
        if draw(st.booleans()):
            other = draw(st.sampled_from(REPLICAS))
            clocks[other].observe(ts, now)
    return deltas


@st.composite
def counter_deltas(draw: st.DrawFn) -> list[PNCounter]:
    states = {r: PNCounter() for r in REPLICAS}
    deltas: list[PNCounter] = []
    for _ in range(draw(st.integers(0, 20))):
        r = draw(st.sampled_from(REPLICAS))
        delta = states[r].increment_delta(r, draw(st.integers(-1000, 1000)))
        states[r].merge(delta)
        deltas.append(delta)
    return deltas


ANY_DELTAS = st.one_of(orset_deltas(), lww_deltas(), counter_deltas())
