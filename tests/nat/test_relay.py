from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.bucket import TokenBucket
from nat.endpoint import Endpoint
from nat.relay import (
    CloseRelay,
    Forward,
    MigrateToDirect,
    Opened,
    PathState,
    PathUpgrade,
    Refusal,
    Refused,
    Relay,
    RelayLimits,
    SchedulePunch,
    UseRelay,
)


def test_bucket_allows_burst_then_paces() -> None:
    b = TokenBucket(rate=100.0, burst=50.0, now=0.0)
    assert b.reserve(50, 0.0) == 0.0
    assert b.reserve(100, 0.0) == pytest.approx(1.0)  # 100 bytes of debt at 100 B/s
    assert b.reserve(10, 1.0) == pytest.approx(0.1)  # the debt was paid by t=1
    assert b.available(2.0) == pytest.approx(50.0)  # refills only up to the burst
    with pytest.raises(ValueError):
        b.reserve(-1, 2.0)
    with pytest.raises(ValueError):
        TokenBucket(0, 1, 0.0)


@settings(max_examples=80, deadline=None)
@given(
    rate=st.floats(10.0, 1e6),
    burst=st.floats(1.0, 1e5),
    chunks=st.lists(st.tuples(st.integers(0, 100_000), st.floats(0.0, 0.5)), min_size=1,
                    max_size=40),
)
def test_bucket_long_run_rate_never_exceeds_rate_plus_burst(
    rate: float, burst: float, chunks: list[tuple[int, float]]
) -> None:
    """A sender that honours every returned delay never sends more than
    burst + rate * elapsed bytes by any send time."""
    b = TokenBucket(rate, burst, 0.0)
    now = 0.0
    sends: list[tuple[float, int]] = []
    for n, gap in chunks:
        now += gap
        delay = b.reserve(n, now)
        sends.append((now + delay, n))
    sends.sort()
    total = 0
    for t, n in sends:
        total += n
        assert total <= burst + rate * t + 1e-6 * max(1.0, total)


def test_relay_admission_limits() -> None:
    relay = Relay(RelayLimits(max_circuits=3, max_circuits_per_peer=2))
    assert relay.open("a", "a", 0.0) == Refused(Refusal.SAME_PEER)
    c1 = relay.open("a", "b", 0.0)
    c2 = relay.open("a", "c", 0.0)
    assert isinstance(c1, Opened) and isinstance(c2, Opened) and c1.circuit != c2.circuit
    assert relay.open("a", "d", 0.0) == Refused(Refusal.TOO_MANY_FOR_PEER)
    assert isinstance(relay.open("d", "e", 0.0), Opened)
    assert relay.open("f", "g", 0.0) == Refused(Refusal.TOO_MANY_CIRCUITS)
    assert relay.close(c1.circuit)
    assert not relay.close(c1.circuit)
    assert isinstance(relay.open("f", "g", 0.0), Opened)
    stats = relay.statistics()
    assert (stats.open_circuits, stats.opened_total, stats.refused_total, stats.closed_total) == (
        3, 4, 3, 1,
    )


def test_relay_paces_per_circuit_and_in_total() -> None:
    limits = RelayLimits(circuit_rate=1000, circuit_burst=1000, total_rate=1500, total_burst=1500)
    relay = Relay(limits, now=0.0)
    c1 = relay.open("a", "b", 0.0)
    c2 = relay.open("c", "d", 0.0)
    assert isinstance(c1, Opened) and isinstance(c2, Opened)
    assert relay.forward(c1.circuit, 1000, 0.0) == Forward(0.0)
    # c1's own bucket is empty: 1000 more bytes wait a full second.
    assert relay.forward(c1.circuit, 1000, 0.0) == Forward(pytest.approx(1.0))
    # c2 has its own budget, but the relay total (1500/s) is now 500 in debt.
    fwd = relay.forward(c2.circuit, 500, 0.0)
    assert isinstance(fwd, Forward) and fwd.delay == pytest.approx(2 / 3)
    assert relay.statistics().bytes_total == 2500
    assert relay.statistics().bytes_by_circuit == {c1.circuit: 2000, c2.circuit: 500}


def test_relay_lifetime_and_byte_cap() -> None:
    relay = Relay(RelayLimits(max_duration=120.0, max_circuit_bytes=1000))
    c = relay.open("a", "b", 0.0)
    d = relay.open("c", "d", 50.0)
    assert isinstance(c, Opened) and isinstance(d, Opened)
    assert relay.forward(c.circuit, 900, 1.0) == Forward(0.0)
    assert relay.forward(c.circuit, 200, 2.0) == Refused(Refusal.BYTES)
    assert relay.forward(c.circuit, 1, 3.0) == Refused(Refusal.UNKNOWN_CIRCUIT)
    assert relay.next_expiry() == 170.0
    assert relay.forward(d.circuit, 1, 170.5) == Refused(Refusal.DURATION)
    e = relay.open("e", "f", 200.0)
    assert isinstance(e, Opened)
    assert relay.expire(320.0) == ()
    assert relay.expire(320.1) == (e.circuit,)
    assert relay.next_expiry() is None


def test_path_upgrade_keeps_relay_until_drained() -> None:
    path = PathUpgrade(punch_retry=60.0)
    direct = Endpoint("198.51.100.3", 4000)
    assert path.relay_up(0.0) == [UseRelay(), SchedulePunch(0.0)]
    assert path.relay_up(1.0) == []
    assert path.direct_up(direct) == [MigrateToDirect(direct)]
    assert path.state is PathState.MIGRATING
    assert path.direct_up(direct) == []
    assert path.relay_drained() == [CloseRelay()]
    assert path.state is PathState.DIRECT
    assert path.relay_drained() == []
    assert path.direct_lost(100.0, relay_available=True) == [UseRelay(), SchedulePunch(160.0)]
    assert path.state is PathState.RELAYED and path.remote is None


def test_path_direct_first_and_loss_without_relay() -> None:
    path = PathUpgrade()
    direct = Endpoint("198.51.100.3", 4000)
    assert path.direct_lost(0.0, True) == []  # nothing to lose yet
    assert path.direct_up(direct) == [MigrateToDirect(direct)]
    assert path.state is PathState.DIRECT
    assert path.relay_up(1.0) == []  # already direct: no relay needed
    assert path.direct_lost(5.0, relay_available=False) == [SchedulePunch(5.0)]
    assert path.state is PathState.NONE
