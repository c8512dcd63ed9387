from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.endpoint import Endpoint, NatType
from nat.probe import (
    MAX_TARGETS,
    PACKET_BYTES,
    ProbeKind,
    birthday_plan,
    birthday_success,
    dial_targets,
    encode_probe,
    is_probe_packet,
    parse_probe_untrusted,
)

TOKEN = b"T" * 16


def test_probe_round_trip_and_quic_bit_clear() -> None:
    pkt = encode_probe(ProbeKind.ACK, TOKEN)
    assert len(pkt) == PACKET_BYTES
    assert pkt[0] & 0x40 == 0  # never mistaken for QUIC
    parsed = parse_probe_untrusted(pkt)
    assert parsed is not None and parsed.kind is ProbeKind.ACK and parsed.token == TOKEN


def test_non_probes_are_rejected() -> None:
    pkt = encode_probe(ProbeKind.PROBE, TOKEN)
    assert parse_probe_untrusted(pkt[:-1]) is None
    assert parse_probe_untrusted(pkt + b"x") is None
    assert parse_probe_untrusted(pkt[:4] + b"\x09" + pkt[5:]) is None
    assert parse_probe_untrusted(b"\xc0" + pkt[1:]) is None  # a QUIC long header
    with pytest.raises(ValueError):
        encode_probe(ProbeKind.PROBE, b"short")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_parse_never_raises(data: bytes) -> None:
    result = parse_probe_untrusted(data)
    assert result is None or is_probe_packet(data)


def test_targets_include_predictions_only_for_hard_peers() -> None:
    pub = Endpoint("198.51.100.4", 40000)
    lan = Endpoint("10.2.0.2", 5000)
    assert dial_targets([lan, pub], NatType.EASY, 2, 3) == (lan, pub)
    assert dial_targets([lan, pub], NatType.HARD, 0, 3) == (lan, pub)
    hard = dial_targets([lan, pub], NatType.HARD, 2, 3)
    assert hard == (lan, pub, *(Endpoint(pub.ip, 40000 + 2 * i) for i in (1, 2, 3)))


def test_targets_are_capped_and_deduplicated() -> None:
    many = [Endpoint("198.51.100.4", 1000 + i) for i in range(50)]
    out = dial_targets(many + many, NatType.HARD, 1, 10)
    assert len(out) == MAX_TARGETS
    assert len(set(out)) == len(out)


def test_birthday_figures_match_the_paradox() -> None:
    # Tailscale's figure: 256 sockets, 1024 probes over 64512 ports -> ~98%.
    assert birthday_success(256, 1024, 64512) == pytest.approx(0.983, abs=0.005)
    assert birthday_success(0, 1024, 64512) == 0.0
    assert birthday_success(10, 5, 10) == 1.0


def test_birthday_plan_is_capped_distinct_and_in_range() -> None:
    plan = birthday_plan(random.Random(7), max_probes=500, low=20000, high=30000)
    assert len(plan.probe_ports) == 500
    assert len(set(plan.probe_ports)) == 500
    assert all(20000 <= p <= 30000 for p in plan.probe_ports)
    small = birthday_plan(random.Random(7), max_probes=5000, low=60000, high=60099)
    assert len(small.probe_ports) == 100  # cannot exceed the range
    assert small.success_probability == 1.0  # 256 sockets cover 100 ports
    with pytest.raises(ValueError):
        birthday_plan(random.Random(1), low=10, high=5)
