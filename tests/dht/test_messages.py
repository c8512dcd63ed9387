"""DHT wire messages: round trips, and garbage only ever raises ProtocolError."""

from __future__ import annotations

import contextlib
import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.dht.messages import (
    METHOD_FIND_NODE,
    METHOD_FIND_VALUE,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    ContactList,
    FindNodeRequest,
    FindValueResponse,
    decode_request,
    decode_response,
)
from peerd.dht.records import make_record, owned_subkey
from peerd.dht.routing import Contact
from peerd.dht.sim import sim_identity
from peerd.errors import ProtocolError
from peerd.identity import Identity
from peerd.wire import WIRE_VERSION, encode


def _id(n: int) -> Identity:
    return sim_identity(f"test-{n}")


def contacts(n: int) -> list[Contact]:
    return [Contact(_id(i).peer_id, (f"10.0.0.{i}:7000", f"[::{i}]:7000")) for i in range(n)]


def test_find_value_response_round_trips() -> None:
    key = hashlib.sha256(b"k").digest()
    # A full-length sub-key (publisher id + 64 bytes) travels intact.
    subkey = owned_subkey(_id(1).peer_id.raw, b"s" * 64)
    record = make_record(_id(1), key, {"x": 1}, ttl=60, now=0.0, subkey=subkey)
    msg = FindValueResponse((record,), ContactList.of(contacts(20)))
    back = decode_response(METHOD_FIND_VALUE, encode(msg))
    assert back == msg
    assert back.contacts.to_contacts() == contacts(20)


def test_request_for_wrong_method_is_refused() -> None:
    payload = encode(FindNodeRequest(b"\x01" * 32, ()))
    assert decode_request(METHOD_FIND_NODE, payload).target == b"\x01" * 32
    with pytest.raises(ProtocolError):
        decode_request(METHOD_FIND_VALUE, payload)
    with pytest.raises(ProtocolError):
        decode_request("dht/1/nope", payload)


@pytest.mark.parametrize(
    "fields",
    [
        [b"\x00" * 31, ()],  # short target
        [b"\x00" * 32, ["a"] * 9],  # too many addresses
        [b"\x00" * 32, ["a" * 300]],  # address too long
        [b"\x00" * 32],  # missing field
    ],
)
def test_invalid_request_fields_raise_protocol_error(fields: list[object]) -> None:
    type_id = {v: k for k, v in __import__("peerd.wire").wire.registered_types().items()}
    body = msgpack.packb([WIRE_VERSION, type_id[FindNodeRequest], *fields], use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode_request(METHOD_FIND_NODE, body)


def test_contact_lists_that_do_not_line_up_are_refused() -> None:
    with pytest.raises(ValueError):
        ContactList(b"\x00" * 33, ("a",))
    with pytest.raises(ValueError):
        ContactList(b"\x00" * 32, (" ".join(["a"] * 9),))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(REQUEST_TYPES)), st.binary(max_size=300))
def test_fuzzed_bytes_raise_only_protocol_error(method: str, payload: bytes) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(ProtocolError):
            decode(method, payload)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(RESPONSE_TYPES)), st.data())
def test_mutated_responses_raise_only_protocol_error(method: str, data: st.DataObject) -> None:
    key = hashlib.sha256(b"k").digest()
    record = make_record(_id(2), key, [1, 2], ttl=60, now=0.0)
    good = encode(FindValueResponse((record,), ContactList.of(contacts(3))))
    i = data.draw(st.integers(0, len(good) - 1))
    mutated = good[:i] + bytes([data.draw(st.integers(0, 255))]) + good[i + 1 :]
    with contextlib.suppress(ProtocolError):
        decode_response(method, mutated)
