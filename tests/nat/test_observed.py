from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.endpoint import Endpoint
from nat.observed import ObservedAddresses

PUB = Endpoint("198.51.100.7", 40000)
FAKE = Endpoint("192.0.2.66", 1234)


def obs(ip: str, port: int = 9000) -> Endpoint:
    return Endpoint(ip, port)


def test_one_observer_never_confirms() -> None:
    book = ObservedAddresses()
    book.record(obs("203.0.113.1"), PUB, now=0.0)
    assert book.confirmed(0.0) == ()
    assert book.primary(0.0) is None
    assert book.public_ip(0.0) is None


def test_two_ports_of_one_ip_are_one_vote() -> None:
    book = ObservedAddresses()
    book.record(obs("203.0.113.1", 1), PUB, 0.0)
    book.record(obs("203.0.113.1", 2), PUB, 0.0)
    assert book.primary(0.0) is None
    changed = book.record(obs("203.0.113.2"), PUB, 1.0)
    assert changed
    assert book.primary(1.0) == PUB
    assert book.confirmed(1.0) == (PUB,)
    assert book.public_ip(1.0) == PUB.ip


def test_one_liar_cannot_rewrite_a_confirmed_address() -> None:
    book = ObservedAddresses()
    book.record(obs("203.0.113.1"), PUB, 0.0)
    book.record(obs("203.0.113.2"), PUB, 0.0)
    # A third peer (with many ports) insists on something else.
    for port in range(1, 30):
        assert not book.record(obs("203.0.113.66", port), FAKE, 1.0)
    assert book.primary(1.0) == PUB
    assert FAKE not in book.confirmed(1.0)


def test_primary_is_sticky_on_ties_and_moves_on_stronger_support() -> None:
    book = ObservedAddresses()
    new = Endpoint("198.51.100.7", 40001)
    book.record(obs("203.0.113.1"), PUB, 0.0)
    book.record(obs("203.0.113.2"), PUB, 0.0)
    book.record(obs("203.0.113.3"), new, 0.0)
    book.record(obs("203.0.113.4"), new, 0.0)
    assert book.primary(0.0) == PUB  # 2 vs 2: keep what we had
    assert book.record(obs("203.0.113.5"), new, 0.0)
    assert book.primary(0.0) == new
    assert book.statistics().primary_changes == 2


def test_an_observer_changing_its_report_moves_its_vote() -> None:
    book = ObservedAddresses()
    book.record(obs("203.0.113.1"), PUB, 0.0)
    book.record(obs("203.0.113.2"), PUB, 0.0)
    book.record(obs("203.0.113.2"), FAKE, 1.0)  # same observer, new report
    assert book.primary(1.0) is None  # PUB lost its second independent vote


def test_observations_expire() -> None:
    book = ObservedAddresses(ttl=10.0)
    book.record(obs("203.0.113.1"), PUB, 0.0)
    book.record(obs("203.0.113.2"), PUB, 5.0)
    assert book.primary(9.0) == PUB
    assert book.expire(10.5)
    assert book.primary(10.5) is None
    assert len(book.observations(10.5)) == 1


def test_symmetric_nat_confirms_the_ip_but_no_endpoint() -> None:
    book = ObservedAddresses()
    book.record(obs("203.0.113.1"), Endpoint(PUB.ip, 50001), 0.0)
    book.record(obs("203.0.113.2"), Endpoint(PUB.ip, 50002), 0.0)
    assert book.confirmed(0.0) == ()
    assert book.public_ip(0.0) == PUB.ip


def test_min_observers_below_two_is_refused() -> None:
    with pytest.raises(ValueError):
        ObservedAddresses(min_observers=1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3)), max_size=40
    )
)
def test_confirmed_endpoints_always_have_two_observer_ips(
    reports: list[tuple[int, int, int]],
) -> None:
    book = ObservedAddresses(max_observers=8)
    truth: dict[Endpoint, Endpoint] = {}
    for ip_i, port, seen in reports:
        observer = Endpoint(f"203.0.113.{ip_i}", port)
        observed = Endpoint("198.51.100.1", 1000 + seen)
        book.record(observer, observed, 0.0)
        truth.pop(observer, None)
        truth[observer] = observed
        while len(truth) > 8:
            del truth[next(iter(truth))]
    for ep in book.confirmed(0.0):
        ips = {o.ip for o, seen in truth.items() if seen == ep}
        assert len(ips) >= 2
    assert len(book.observations(0.0)) <= 8
    primary = book.primary(0.0)
    assert primary is None or primary in book.confirmed(0.0)
