"""Hybrid logical clock: monotonic, causal, resistant to one peer's broken clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.hlc import MAX_DRIFT_MS, HybridClock, Timestamp

A, B = b"\x01" * 32, b"\x02" * 32


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.booleans(), st.integers(0, 10_000))))
def test_ticks_strictly_increase_and_follow_observed(events: list[tuple[int, bool, int]]) -> None:
    clock = HybridClock(A)
    last = None
    for now, observe, remote_ms in events:
        if observe:
            remote = Timestamp(remote_ms, 3, B)
            clock.observe(remote, now)
            t = clock.tick(now)
            if remote_ms <= now + MAX_DRIFT_MS:
                assert t > remote
        else:
            t = clock.tick(now)
        assert t.wall_ms >= now
        assert last is None or t > last
        last = t


def test_far_future_timestamp_does_not_pull_the_clock() -> None:
    clock = HybridClock(A)
    clock.observe(Timestamp(10**9, 0, B), now_ms=1_000)
    assert clock.tick(1_000) == Timestamp(1_000, 0, A)
    clock.observe(Timestamp(1_000 + MAX_DRIFT_MS, 7, B), now_ms=1_000)
    assert clock.tick(1_000) == Timestamp(1_000 + MAX_DRIFT_MS, 8, A)
