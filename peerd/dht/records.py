"""Signed DHT records: construction, validation and merging (sans-I/O).

A record lives in the slot ``(key, subkey)``. Its publisher signs every field
with its Ed25519 identity key, so any node can check a record it stores or a
lookup returns without trusting whoever relayed it.

Sub-keys are owned by rule, not by who claimed them first: a sub-key must begin
with its publisher's 32-byte peer id (``owned_subkey`` builds one,
``split_subkey`` takes it apart), and the reserved ``NODE_RECORD_SUBKEY`` is
valid only under the publisher's own id as key. Every node checks this on its
own in ``validate()``, so peers announcing under one key (members of a run,
holders of a chunk) cannot overwrite each other whatever order records arrive
in. The plain slot ``(key, None)`` is shared: a node keeps the first live claim
it saw, and ``merge_records`` settles disagreements between holders.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from peerd.errors import ProtocolError
from peerd.identity import Identity, PeerId, verify_signature
from peerd.wire import Limits, message, unpack_untrusted

KEY_BYTES = 32
# Sub-keys start with their publisher's raw peer id (sha256 of its public key).
PEER_ID_BYTES = 32
SIGNATURE_DOMAIN = b"peerd-dht-record-v1\x00"
# The slot (peer_id.raw, NODE_RECORD_SUBKEY) holds a peer's own signed address list;
# only that peer may publish into it.
NODE_RECORD_SUBKEY = b"peerd/node"


@dataclass(frozen=True)
class RecordLimits:
    """What one node accepts to store for others."""

    max_record_bytes: int = 4096
    # The publisher's 32-byte peer id plus up to 64 bytes the caller chose.
    max_subkey_bytes: int = PEER_ID_BYTES + 64
    max_ttl: float = 48 * 3600.0
    clock_skew: float = 60.0
    max_records_per_publisher: int = 256
    max_records: int = 100_000


DEFAULT_RECORD_LIMITS = RecordLimits()
_VALUE_LIMITS = Limits(max_frame=DEFAULT_RECORD_LIMITS.max_record_bytes, max_depth=8)


@message(100)
@dataclass(frozen=True)
class Record:
    """One signed value. ``value`` is the msgpack encoding of what was put."""

    key: bytes
    subkey: bytes | None
    value: bytes
    publisher: bytes
    public_key: bytes
    seq: int
    expires_at: float
    signature: bytes

    def __post_init__(self) -> None:
        # Structural checks only; signature, size limits and expiry are in validate().
        if len(self.key) != KEY_BYTES:
            raise ValueError("record key must be 32 bytes")
        if len(self.publisher) != 32 or len(self.public_key) != 32:
            raise ValueError("publisher id and public key must be 32 bytes")
        if len(self.signature) != 64:
            raise ValueError("signature must be 64 bytes")
        if not 0 <= self.seq < 2**63:
            raise ValueError("seq out of range")

    @property
    def slot(self) -> tuple[bytes, bytes | None]:
        return (self.key, self.subkey)

    @property
    def publisher_id(self) -> PeerId:
        return PeerId(self.publisher)

    @property
    def size(self) -> int:
        """Bytes counted against ``max_record_bytes`` (fields, not framing)."""
        return len(self.key) + len(self.subkey or b"") + len(self.value) + 32 + 32 + 8 + 8 + 64

    def decoded_value(self) -> Any:
        """The value as put; raises ``ProtocolError`` if it is not bounded msgpack."""
        return unpack_untrusted(self.value, _VALUE_LIMITS)


class Reject(enum.Enum):
    """Why a record was refused."""

    BAD_KEY = "bad_key"
    OVERSIZED = "oversized"
    EXPIRED = "expired"
    TTL_TOO_LONG = "ttl_too_long"
    PUBLISHER_MISMATCH = "publisher_mismatch"
    BAD_SIGNATURE = "bad_signature"
    BAD_VALUE = "bad_value"
    RESERVED_SUBKEY = "reserved_subkey"
    # The sub-key lies outside the publisher's namespace (does not start with its id).
    SUBKEY_NOT_OWNED = "subkey_not_owned"
    # Another publisher's live plain value (subkey None) already holds the slot here.
    SUBKEY_OWNED = "subkey_owned"
    STALE = "stale"
    QUOTA = "quota"
    FULL = "full"


def owned_subkey(publisher: bytes, subkey: bytes) -> bytes:
    """``subkey`` inside ``publisher``'s namespace: prefixed with the publisher's raw
    peer id, unless it already starts with it (so passing a full sub-key back is a
    no-op; a caller's own suffix that happens to start with its id is taken as full)."""
    if len(publisher) != PEER_ID_BYTES:
        raise ValueError("publisher must be a 32-byte raw peer id")
    return subkey if subkey.startswith(publisher) else publisher + subkey


def split_subkey(subkey: bytes) -> tuple[PeerId, bytes]:
    """``(publisher, suffix)`` of a namespaced sub-key as ``Dht.get`` returns it.

    ``ValueError`` for the reserved node-record sub-key or anything shorter than a
    peer id, which no valid record carries outside the node-record slot."""
    if subkey == NODE_RECORD_SUBKEY or len(subkey) < PEER_ID_BYTES:
        raise ValueError("not a namespaced sub-key")
    return PeerId(subkey[:PEER_ID_BYTES]), subkey[PEER_ID_BYTES:]


def subkey_reject(key: bytes, subkey: bytes | None, publisher: bytes) -> Reject | None:
    """The ownership rule alone (no signature): may ``publisher`` write ``(key, subkey)``?"""
    if subkey is None:
        return None
    if subkey == NODE_RECORD_SUBKEY:
        return None if key == publisher else Reject.RESERVED_SUBKEY
    if not subkey.startswith(publisher):
        return Reject.SUBKEY_NOT_OWNED
    return None


def signing_bytes(
    key: bytes, subkey: bytes | None, value: bytes, publisher: bytes, public_key: bytes,
    seq: int, expires_at: float,
) -> bytes:
    """The exact bytes a publisher signs: a domain tag plus every field but the signature."""
    body = msgpack.packb(
        [key, subkey, value, publisher, public_key, seq, float(expires_at)], use_bin_type=True
    )
    return SIGNATURE_DOMAIN + body


def make_record(
    identity: Identity, key: bytes, value: Any, *, ttl: float, now: float,
    subkey: bytes | None = None, seq: int = 0,
) -> Record:
    """Sign ``value`` under ``(key, subkey)``; raises ``ValueError`` on unencodable input."""
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"DHT value is not msgpack-encodable: {exc}") from None
    expires_at = float(now + ttl)
    publisher = identity.peer_id.raw
    sig = identity.sign(
        signing_bytes(key, subkey, packed, publisher, identity.public_key, seq, expires_at)
    )
    return Record(key, subkey, packed, publisher, identity.public_key, seq, expires_at, sig)


def validate(
    record: Record, now: float, limits: RecordLimits = DEFAULT_RECORD_LIMITS
) -> Reject | None:
    """Everything a record must satisfy on its own; ``None`` means valid.

    Cheap checks run first so garbage costs no signature verification.
    """
    if len(record.key) != KEY_BYTES:
        return Reject.BAD_KEY
    if record.subkey is not None and len(record.subkey) > limits.max_subkey_bytes:
        return Reject.OVERSIZED
    if record.size > limits.max_record_bytes:
        return Reject.OVERSIZED
    if record.expires_at <= now:
        return Reject.EXPIRED
    if record.expires_at > now + limits.max_ttl + limits.clock_skew:
        return Reject.TTL_TOO_LONG
    if PeerId.from_public_key(record.public_key).raw != record.publisher:
        return Reject.PUBLISHER_MISMATCH
    owner_reason = subkey_reject(record.key, record.subkey, record.publisher)
    if owner_reason is not None:
        return owner_reason
    message_bytes = signing_bytes(
        record.key, record.subkey, record.value, record.publisher, record.public_key,
        record.seq, record.expires_at,
    )
    if not verify_signature(record.public_key, message_bytes, record.signature):
        return Reject.BAD_SIGNATURE
    try:
        record.decoded_value()
    except ProtocolError:
        return Reject.BAD_VALUE
    return None


def merge_records(responses: Sequence[Sequence[Record]]) -> dict[bytes | None, Record]:
    """Pick one record per subkey from several holders' answers (already validated).

    ``responses`` is ordered nearest holder first. Within one publisher the
    highest ``seq`` wins. A sub-key has exactly one possible publisher (its
    namespace owner; validation dropped the rest), so only the shared plain slot
    (subkey ``None``) can see holders disagree about its publisher, after a race
    between claimants: there the publisher reported by the most holders wins,
    ties going to the nearest holder.
    """
    votes: dict[bytes | None, dict[bytes, int]] = {}
    first_seen: dict[bytes | None, dict[bytes, int]] = {}
    best: dict[tuple[bytes | None, bytes], Record] = {}
    order = 0
    for records in responses:
        seen_here: set[tuple[bytes | None, bytes]] = set()
        for rec in records:
            owner = (rec.subkey, rec.publisher)
            if owner not in seen_here:
                seen_here.add(owner)
                votes.setdefault(rec.subkey, {})
                votes[rec.subkey][rec.publisher] = votes[rec.subkey].get(rec.publisher, 0) + 1
                first_seen.setdefault(rec.subkey, {}).setdefault(rec.publisher, order)
                order += 1
            cur = best.get(owner)
            if cur is None or rec.seq > cur.seq:
                best[owner] = rec
    merged: dict[bytes | None, Record] = {}
    for subkey, by_pub in votes.items():
        winner = min(by_pub, key=lambda pub: (-by_pub[pub], first_seen[subkey][pub]))
        merged[subkey] = best[(subkey, winner)]
    return merged
