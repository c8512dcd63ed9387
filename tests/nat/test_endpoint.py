from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.endpoint import Endpoint, NatType, is_lan_address
from nat.punch import PUNCH_VERSION, PunchConnect, PunchSync
from peerd.errors import ProtocolError
from peerd.wire import decode_untrusted, encode

TOKEN = bytes(range(16))


def test_endpoint_normalises_and_validates() -> None:
    assert Endpoint("2001:DB8::1", 80).ip == "2001:db8::1"
    assert str(Endpoint("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert str(Endpoint("203.0.113.5", 4000)) == "203.0.113.5:4000"
    for ip, port in [("nope", 1), ("1.2.3.4", 0), ("1.2.3.4", 65536), ("1.2.3.4", True)]:
        with pytest.raises(ValueError):
            Endpoint(ip, port)  # type: ignore[arg-type]


def test_lan_addresses_exclude_documentation_prefixes() -> None:
    assert is_lan_address("10.1.0.2")
    assert is_lan_address("192.168.1.1")
    assert is_lan_address("100.64.3.4")
    assert is_lan_address("fe80::1")
    # The lab's "internet" must count as public even though Python calls it private.
    assert not is_lan_address("203.0.113.7")
    assert not is_lan_address("198.51.100.1")
    assert not is_lan_address("8.8.8.8")


def test_punch_messages_round_trip_over_the_wire() -> None:
    msg = PunchConnect(
        PUNCH_VERSION, 2, TOKEN, (Endpoint("203.0.113.9", 5000), Endpoint("10.0.0.2", 5000)),
        NatType.HARD, 2,
    )
    assert decode_untrusted(encode(msg)) == msg
    sync = PunchSync(PUNCH_VERSION, 2, TOKEN)
    assert decode_untrusted(encode(sync)) == sync


def test_bad_punch_fields_become_protocol_errors() -> None:
    good = PunchConnect(PUNCH_VERSION, 1, TOKEN, (), NatType.EASY, 0)
    body = encode(good)
    # Re-encode with each field broken; the one decoding door must say ProtocolError.
    plain = msgpack.unpackb(body)
    broken = [
        {4: [["203.0.113.1", 70000]]},  # port out of range
        {4: [["not-an-ip", 1]]},
        {4: [["203.0.113.1", 1]] * 40},  # too many candidates
        {3: b"short"},  # token length
        {2: 0},  # attempt
        {5: 9},  # unknown NAT type
        {6: 5000},  # port step out of range
        {1: 99},  # wrong punch version
    ]
    for patch in broken:
        fields = list(plain)
        for idx, value in patch.items():
            fields[idx] = value
        with pytest.raises(ProtocolError):
            decode_untrusted(msgpack.packb(fields))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_error(data: bytes) -> None:
    # Anything but ProtocolError propagates and fails the test.
    with contextlib.suppress(ProtocolError):
        decode_untrusted(data, expect=PunchConnect)
