from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nat.classify import Classification, DialBack, Filtering, Mapping, classify, nat_type_of
from nat.endpoint import Endpoint, NatType
from nat.observed import Observation

LOCAL = Endpoint("10.1.0.2", 5000)
PUBLIC_IP = "198.51.100.20"


def seen(observer: tuple[str, int], port: int, at: float = 0.0, ip: str = PUBLIC_IP) -> Observation:
    return Observation(Endpoint(*observer), Endpoint(ip, port), at)


O1, O2, O3 = ("203.0.113.10", 7000), ("203.0.113.11", 7000), ("203.0.113.12", 7000)


def test_one_observer_ip_is_unknown() -> None:
    c = classify([LOCAL], [seen(O1, 5000), seen(("203.0.113.10", 7001), 5000)])
    assert c.mapping is Mapping.UNKNOWN
    assert c.nat_type is NatType.UNKNOWN
    assert c.public_ip is None


def test_lan_observers_are_ignored() -> None:
    lan = Observation(Endpoint("10.1.0.3", 7000), LOCAL, 0.0)
    c = classify([LOCAL], [lan, seen(O1, 5000)])
    assert c.mapping is Mapping.UNKNOWN


def test_endpoint_independent_mapping() -> None:
    c = classify([LOCAL], [seen(O1, 5000), seen(O2, 5000)])
    assert c.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert c.filtering is Filtering.UNKNOWN
    assert c.nat_type is NatType.EASY
    assert c.public_ip == PUBLIC_IP
    assert c.port_deltas == ()


def test_no_translation_is_public() -> None:
    me = Endpoint("203.0.113.5", 4000)
    c = classify([me], [seen(O1, 4000, ip=me.ip), seen(O2, 4000, ip=me.ip)])
    assert c.mapping is Mapping.NONE
    assert c.nat_type is NatType.PUBLIC


def test_firewalled_public_host_is_easy() -> None:
    me = Endpoint("203.0.113.5", 4000)
    fail = DialBack(Endpoint("203.0.113.99", 1), me, reached=False)
    c = classify([me], [seen(O1, 4000, ip=me.ip), seen(O2, 4000, ip=me.ip)], [fail])
    assert c.filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT
    assert c.nat_type is NatType.EASY


def test_full_cone_counts_as_public() -> None:
    target = Endpoint(PUBLIC_IP, 5000)
    ok = DialBack(Endpoint("203.0.113.99", 1), target, reached=True)
    c = classify([LOCAL], [seen(O1, 5000), seen(O2, 5000)], [ok])
    assert c.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert c.nat_type is NatType.PUBLIC


def test_filtering_levels_from_dial_backs() -> None:
    obs = [seen(O1, 5000), seen(O2, 5000)]
    target = Endpoint(PUBLIC_IP, 5000)
    same_ip_other_port = Endpoint(O1[0], 7777)
    other_ip = Endpoint("203.0.113.99", 7000)
    contacted = Endpoint(*O1)
    # A dial-back from an endpoint we already sent to proves nothing.
    assert classify([LOCAL], obs, [DialBack(contacted, target, True)]).filtering is (
        Filtering.UNKNOWN
    )
    adf = classify(
        [LOCAL],
        obs,
        [DialBack(same_ip_other_port, target, True), DialBack(other_ip, target, False)],
    )
    assert adf.filtering is Filtering.ADDRESS_DEPENDENT
    assert adf.nat_type is NatType.EASY
    apdf = classify(
        [LOCAL],
        obs,
        [DialBack(same_ip_other_port, target, False), DialBack(other_ip, target, False)],
    )
    assert apdf.filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT


def test_port_per_destination_is_symmetric() -> None:
    same_ip = ("203.0.113.10", 7001)
    c = classify([LOCAL], [seen(O1, 40001, 0.0), seen(same_ip, 40002, 1.0), seen(O2, 40003, 2.0)])
    assert c.mapping is Mapping.ADDRESS_AND_PORT_DEPENDENT
    assert c.nat_type is NatType.HARD
    assert c.port_deltas == (1, 1)
    assert c.port_step == 1
    assert c.last_port == 40003
    assert c.predict_ports(3) == (40004, 40005, 40006)


def test_port_per_ip_only_is_address_dependent() -> None:
    c = classify([LOCAL], [seen(O1, 40010, 0.0), seen(("203.0.113.10", 7001), 40010, 1.0),
                           seen(O2, 40020, 2.0)])
    assert c.mapping is Mapping.ADDRESS_DEPENDENT
    assert c.nat_type is NatType.HARD
    assert c.port_step is None  # one delta is not a pattern
    assert c.predict_ports(2) == ()


def test_random_ports_are_not_predicted() -> None:
    c = classify([LOCAL], [seen(O1, 40001, 0.0), seen(O2, 52011, 1.0), seen(O3, 33120, 2.0)])
    # One port per observer IP: address-dependent is all that can be claimed.
    assert c.mapping is Mapping.ADDRESS_DEPENDENT
    assert c.nat_type is NatType.HARD
    assert c.port_deltas == (12010, -18891)
    assert c.port_step is None


def test_several_public_ips_are_hard() -> None:
    c = classify([LOCAL], [seen(O1, 5000, ip="198.51.100.1"), seen(O2, 5000, ip="198.51.100.2")])
    assert c.mapping is Mapping.ADDRESS_AND_PORT_DEPENDENT
    assert c.public_ip is None


def test_prediction_stays_in_port_range() -> None:
    c = Classification(Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.UNKNOWN, NatType.HARD,
                       PUBLIC_IP, (2, 2), 2, 65532)
    assert c.predict_ports(5) == (65534,)


def test_nat_type_table() -> None:
    assert nat_type_of(Mapping.UNKNOWN, Filtering.ENDPOINT_INDEPENDENT) is NatType.UNKNOWN
    for f in Filtering:
        assert nat_type_of(Mapping.ADDRESS_AND_PORT_DEPENDENT, f) is NatType.HARD
        assert nat_type_of(Mapping.ADDRESS_DEPENDENT, f) is NatType.HARD
    assert nat_type_of(Mapping.ENDPOINT_INDEPENDENT, Filtering.UNKNOWN) is NatType.EASY


@settings(max_examples=80, deadline=None)
@given(
    start=st.integers(1024, 60000),
    step=st.integers(-8, 8).filter(lambda s: s != 0),
    n=st.integers(3, 6),
)
def test_sequential_allocator_is_predicted(start: int, step: int, n: int) -> None:
    obs = [seen((f"203.0.113.{i + 1}", 7000), start + i * step, float(i)) for i in range(n)]
    c = classify([LOCAL], obs)
    assert c.mapping is Mapping.ADDRESS_DEPENDENT or c.mapping is Mapping.ADDRESS_AND_PORT_DEPENDENT
    assert c.port_step == step
    expected = [start + (n - 1 + k) * step for k in (1, 2)]
    assert list(c.predict_ports(2)) == [p for p in expected if 1 <= p <= 65535]
