"""DHT wire messages (type ids 100-199) and their conversions.

Each RPC method carries exactly one request type and answers with one response
type; ``decode_request`` / ``decode_response`` are the only way bytes from a
peer become messages here and raise only ``ProtocolError``. Requests carry the
sender's self-advertised addresses so the receiver can route back to it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peerd.dht.records import Record
from peerd.dht.routing import MAX_ADDRESS_LEN, MAX_ADDRESSES, Contact
from peerd.errors import ProtocolError
from peerd.identity import PeerId
from peerd.wire import Limits, decode_untrusted, encode, message

DHT_PROTOCOL = 1
MAX_CONTACTS = 32
MAX_RECORDS_PER_RESPONSE = 64
DHT_LIMITS = Limits(max_frame=512 * 1024, max_depth=8, max_items=4096,
                    max_str=4096, max_bin=64 * 1024)

METHOD_PING = "dht/1/ping"
METHOD_FIND_NODE = "dht/1/find_node"
METHOD_FIND_VALUE = "dht/1/find_value"
METHOD_STORE = "dht/1/store"


def _check_addresses(addresses: tuple[str, ...]) -> None:
    if len(addresses) > MAX_ADDRESSES or any(len(a) > MAX_ADDRESS_LEN for a in addresses):
        raise ValueError("too many or too long addresses")


@message(101)
@dataclass(frozen=True)
class WireContact:
    peer_id: bytes
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.peer_id) != 32:
            raise ValueError("peer id must be 32 bytes")
        _check_addresses(self.addresses)

    @classmethod
    def of(cls, contact: Contact) -> WireContact:
        return cls(contact.peer_id.raw, contact.addresses)

    def to_contact(self) -> Contact:
        return Contact(PeerId(self.peer_id), self.addresses)


@message(110)
@dataclass(frozen=True)
class ContactList:
    """Contacts packed for speed: ``ids`` is the concatenation of 32-byte peer ids and
    ``addresses[i]`` holds the i-th peer's addresses joined by single spaces. A lookup
    answer carries 20 contacts, and decoding 20 nested messages field by field cost
    more than the rest of the lookup together."""

    ids: bytes
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) % 32 or len(self.ids) // 32 != len(self.addresses):
            raise ValueError("contact ids and addresses do not line up")
        if len(self.addresses) > MAX_CONTACTS:
            raise ValueError("too many contacts")
        for joined in self.addresses:
            if len(joined) > _MAX_JOINED or (
                joined and max(map(len, joined.split(" "))) > MAX_ADDRESS_LEN
            ) or joined.count(" ") >= MAX_ADDRESSES:
                raise ValueError("too many or too long addresses")

    @classmethod
    def of(cls, contacts: Sequence[Contact]) -> ContactList:
        return cls(
            b"".join(c.peer_id.raw for c in contacts),
            tuple(" ".join(c.addresses) for c in contacts),
        )

    def to_contacts(self) -> list[Contact]:
        ids = self.ids
        return [_contact(ids[32 * i : 32 * i + 32], a) for i, a in enumerate(self.addresses)]

    def __len__(self) -> int:
        return len(self.addresses)


_MAX_JOINED = MAX_ADDRESSES * (MAX_ADDRESS_LEN + 1)


@functools.lru_cache(maxsize=65536)
def _contact(raw: bytes, joined: str) -> Contact:
    # Contacts recur in almost every answer; interning skips re-validating them.
    return Contact(PeerId(raw), tuple(joined.split(" ")) if joined else ())


@message(102)
@dataclass(frozen=True)
class PingRequest:
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_addresses(self.addresses)


@message(103)
@dataclass(frozen=True)
class PingResponse:
    # The responder names itself: bootstrap dials addresses before knowing who is there.
    responder: WireContact


@message(104)
@dataclass(frozen=True)
class FindNodeRequest:
    target: bytes
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.target) != 32:
            raise ValueError("target must be 32 bytes")
        _check_addresses(self.addresses)


@message(105)
@dataclass(frozen=True)
class FindNodeResponse:
    contacts: ContactList


@message(106)
@dataclass(frozen=True)
class FindValueRequest:
    key: bytes
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("key must be 32 bytes")
        _check_addresses(self.addresses)


@message(107)
@dataclass(frozen=True)
class FindValueResponse:
    records: tuple[Record, ...]
    contacts: ContactList

    def __post_init__(self) -> None:
        if len(self.records) > MAX_RECORDS_PER_RESPONSE:
            raise ValueError("too many records")


@message(108)
@dataclass(frozen=True)
class StoreRequest:
    record: Record
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_addresses(self.addresses)


@message(109)
@dataclass(frozen=True)
class StoreResponse:
    accepted: bool
    reason: str


REQUEST_TYPES: dict[str, type] = {
    METHOD_PING: PingRequest,
    METHOD_FIND_NODE: FindNodeRequest,
    METHOD_FIND_VALUE: FindValueRequest,
    METHOD_STORE: StoreRequest,
}
RESPONSE_TYPES: dict[str, type] = {
    METHOD_PING: PingResponse,
    METHOD_FIND_NODE: FindNodeResponse,
    METHOD_FIND_VALUE: FindValueResponse,
    METHOD_STORE: StoreResponse,
}


def decode_request(method: str, payload: bytes) -> Any:
    """The request for ``method`` in ``payload``; ``ProtocolError`` on anything else."""
    expect = REQUEST_TYPES.get(method)
    if expect is None:
        raise ProtocolError(f"unknown DHT method {method!r}")
    return decode_untrusted(payload, DHT_LIMITS, expect=expect)


def decode_response(method: str, payload: bytes) -> Any:
    expect = RESPONSE_TYPES.get(method)
    if expect is None:
        raise ProtocolError(f"unknown DHT method {method!r}")
    return decode_untrusted(payload, DHT_LIMITS, expect=expect)


__all__ = ["DHT_PROTOCOL", "decode_request", "decode_response", "encode"]
