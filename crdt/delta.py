"""Signed, membership-proven deltas (sans-I/O).

A delta is an author's ``seq``-th change, touching one or more documents. Its
encoded ``DeltaBody`` is hashed (domain-separated SHA-256, the *digest*); the
author signs the digest with its Ed25519 identity and proves swarm membership
with HMAC-SHA256 over the digest keyed by the swarm key. Anyone may relay the
sealed bytes; every receiver checks, cheapest first: envelope shape, swarm
proof, body shape, author id == hash of the carried public key, signature,
and that each document delta only creates state in its author's own name.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from crdt.counter import PNCounter
from crdt.lww import LwwMap
from crdt.messages import CRDT_PROTOCOL_VERSION, DeltaBody, DocKind, DocOp, SignedDelta
from crdt.orset import ORSet
from crdt.values import check_name, untrusted
from peerd.errors import ProtocolError
from peerd.identity import Identity, PeerId, SwarmKey, verify_signature
from peerd.wire import decode_untrusted, encode

DELTA_DOMAIN = b"peerd-crdt-delta-v1\x00"
MAX_DELTA_BYTES = 256 * 1024
MAX_OPS_PER_DELTA = 1024

State = LwwMap | ORSet | PNCounter


class Rejection(enum.Enum):
    """Why a received delta was dropped (each is counted in statistics)."""

    MALFORMED = "malformed"
    MEMBERSHIP = "membership"
    AUTHOR = "author"
    SIGNATURE = "signature"
    INVALID = "invalid"


class DeltaRejected(ProtocolError):
    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"delta rejected ({reason.value}): {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Op:
    """One document's delta state. The state object is never mutated after creation."""

    kind: DocKind
    name: str
    state: State


@dataclass(frozen=True)
class Delta:
    """A sealed delta: ``blob`` is exactly what is stored and relayed."""

    author: bytes
    seq: int
    digest: bytes
    blob: bytes
    ops: tuple[Op, ...]


def digest_of(body: bytes) -> bytes:
    return hashlib.sha256(DELTA_DOMAIN + body).digest()


def membership_proof(swarm_key: SwarmKey, digest: bytes) -> bytes:
    return hmac.new(swarm_key.raw, digest, hashlib.sha256).digest()


def op_to_wire(op: Op, author: bytes | None = None) -> DocOp:
    """The wire form of one document's (delta) state; ``author`` inside a delta."""
    if isinstance(op.state, LwwMap):
        return DocOp(DocKind.MAP, op.name, map=op.state.to_wire(author))
    if isinstance(op.state, ORSet):
        return DocOp(DocKind.ORSET, op.name, orset=op.state.to_wire(author))
    return DocOp(DocKind.COUNTER, op.name, counter=op.state.to_wire(author))


def seal(identity: Identity, swarm_key: SwarmKey, seq: int, ops: tuple[Op, ...]) -> Delta:
    """Sign ``ops`` as ``identity``'s ``seq``-th delta. ``ValueError`` if too large."""
    author = identity.peer_id.raw
    wire_ops = tuple(op_to_wire(op, author) for op in ops)
    body = encode(DeltaBody(CRDT_PROTOCOL_VERSION, author, seq, wire_ops))
    digest = digest_of(body)
    signed = SignedDelta(
        body, identity.public_key, identity.sign(digest), membership_proof(swarm_key, digest)
    )
    blob = encode(signed)
    if len(blob) > MAX_DELTA_BYTES or len(ops) > MAX_OPS_PER_DELTA:
        raise ValueError(f"delta of {len(blob)} bytes / {len(ops)} ops is too large")
    return Delta(author, seq, digest, blob, ops)


@dataclass(frozen=True)
class Envelope:
    """A received delta whose shape, membership proof and author id check out;
    its signature and contents are not verified yet (see ``open_delta``)."""

    body: DeltaBody
    signed: SignedDelta
    digest: bytes
    blob: bytes


def _reject(reason: Rejection, detail: str) -> DeltaRejected:
    return DeltaRejected(reason, detail)


def parse_envelope(blob: bytes, swarm_key: SwarmKey) -> Envelope:
    """Cheap checks first; raises ``DeltaRejected`` (a ``ProtocolError``)."""
    if len(blob) > MAX_DELTA_BYTES:
        raise _reject(Rejection.MALFORMED, f"{len(blob)} bytes")
    try:
        signed = decode_untrusted(blob, expect=SignedDelta)
    except ProtocolError as exc:
        raise _reject(Rejection.MALFORMED, str(exc)) from None
    digest = digest_of(signed.body)
    if not hmac.compare_digest(membership_proof(swarm_key, digest), signed.proof):
        raise _reject(Rejection.MEMBERSHIP, "swarm key proof does not match")
    try:
        body = decode_untrusted(signed.body, expect=DeltaBody)
    except ProtocolError as exc:
        raise _reject(Rejection.MALFORMED, str(exc)) from None
    if body.version != CRDT_PROTOCOL_VERSION:
        raise _reject(Rejection.MALFORMED, f"delta version {body.version}")
    if not 1 <= body.seq < 2**63 or not 0 < len(body.ops) <= MAX_OPS_PER_DELTA:
        raise _reject(Rejection.MALFORMED, "seq or op count out of range")
    if len(signed.public_key) != 32 or PeerId.from_public_key(signed.public_key).raw != body.author:
        raise _reject(Rejection.AUTHOR, "author id is not the hash of the carried key")
    return Envelope(body, signed, digest, blob)


def open_delta(envelope: Envelope, *, check_signature: bool = True) -> Delta:
    """Verify the signature and contents of a parsed envelope.

    ``check_signature=False`` is only for replaying the node's own database,
    whose deltas were verified when first accepted."""
    signed, body = envelope.signed, envelope.body
    if check_signature and not verify_signature(
        signed.public_key, envelope.digest, signed.signature
    ):
        raise _reject(Rejection.SIGNATURE, "bad Ed25519 signature")
    ops = tuple(_op_from_wire(op, body.author) for op in body.ops)
    return Delta(body.author, body.seq, envelope.digest, envelope.blob, ops)


def _op_from_wire(op: DocOp, author: bytes) -> Op:
    try:
        name = untrusted(check_name, op.name)
        state: State
        if op.map is not None:
            state = LwwMap.from_wire(op.map, author)
            ok = state.authors() == {author}
        elif op.orset is not None:
            state = ORSet.from_wire(op.orset, author)
            ok = state.entry_replicas() <= {author}
        else:
            assert op.counter is not None  # DocOp.__post_init__ guarantees one field
            state = PNCounter.from_wire(op.counter, author)
            ok = state.replicas() <= {author}
    except DeltaRejected:
        raise
    except ProtocolError as exc:
        raise _reject(Rejection.INVALID, str(exc)) from None
    if not ok:
        raise _reject(Rejection.INVALID, f"{op.kind.name} delta creates state for another peer")
    return Op(op.kind, name, state)


def verify_untrusted(blob: bytes, swarm_key: SwarmKey) -> Delta:
    """Every check at once; raises only ``ProtocolError`` (``DeltaRejected``)."""
    return open_delta(parse_envelope(blob, swarm_key))


__all__ = [
    "Delta",
    "DeltaRejected",
    "Envelope",
    "Op",
    "Rejection",
    "op_to_wire",
    "open_delta",
    "parse_envelope",
    "seal",
    "verify_untrusted",
]
