"""Sealed deltas: every forgery is rejected with its own reason; parsing is one door."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.counter import PNCounter
from crdt.delta import (
    Delta,
    DeltaRejected,
    Op,
    Rejection,
    digest_of,
    membership_proof,
    seal,
    verify_untrusted,
)
from crdt.hlc import Timestamp
from crdt.lww import LwwMap
from crdt.messages import DeltaBody, DocKind, SignedDelta
from crdt.orset import ORSet
from peerd.errors import ProtocolError
from peerd.identity import Identity, SwarmKey
from peerd.wire import decode_untrusted, encode

ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")
KEY = SwarmKey(b"s" * 32)
OTHER_KEY = SwarmKey(b"o" * 32)


def map_op(author: Identity, value: object = 1) -> Op:
    ts = Timestamp(1_000, 0, author.peer_id.raw)
    return Op(DocKind.MAP, "run/abc", LwwMap.set_delta("lr", value, ts))


def reason(blob: bytes, key: SwarmKey = KEY) -> Rejection:
    with pytest.raises(DeltaRejected) as info:
        verify_untrusted(blob, key)
    return info.value.reason


def reseal(signed: SignedDelta, body: DeltaBody, signer: Identity, key: SwarmKey) -> bytes:
    raw = encode(body)
    digest = digest_of(raw)
    return encode(
        dataclasses.replace(
            signed,
            body=raw,
            signature=signer.sign(digest),
            proof=membership_proof(key, digest),
        )
    )


def test_seal_then_verify_roundtrip() -> None:
    delta = seal(ALICE, KEY, 1, (map_op(ALICE, [1, "x"]),))
    opened = verify_untrusted(delta.blob, KEY)
    assert (opened.author, opened.seq, opened.digest) == (ALICE.peer_id.raw, 1, delta.digest)
    assert opened.ops == delta.ops


def test_wrong_swarm_key_is_a_membership_rejection() -> None:
    assert reason(seal(ALICE, OTHER_KEY, 1, (map_op(ALICE),)).blob) is Rejection.MEMBERSHIP


def test_bad_signature_is_rejected() -> None:
    good = decode_untrusted(seal(ALICE, KEY, 1, (map_op(ALICE),)).blob)
    sig = bytes([good.signature[0] ^ 1]) + good.signature[1:]
    assert reason(encode(dataclasses.replace(good, signature=sig))) is Rejection.SIGNATURE


def test_tampered_body_with_recomputed_proof_fails_signature() -> None:
    # A member who holds the swarm key but not Alice's identity key.
    delta = seal(ALICE, KEY, 1, (map_op(ALICE, 1),))
    signed = decode_untrusted(delta.blob)
    body = decode_untrusted(signed.body)
    forged = seal(ALICE, KEY, 1, (map_op(ALICE, 666),))
    forged_ops = decode_untrusted(decode_untrusted(forged.blob).body).ops
    raw = encode(dataclasses.replace(body, ops=forged_ops))
    proof = membership_proof(KEY, digest_of(raw))
    blob = encode(dataclasses.replace(signed, body=raw, proof=proof))
    assert reason(blob) is Rejection.SIGNATURE


def test_author_must_match_carried_key() -> None:
    # Mallory signs correctly with her own key but claims to be Alice.
    delta = seal(MALLORY, KEY, 1, (map_op(ALICE),))
    signed = decode_untrusted(delta.blob)
    body = dataclasses.replace(decode_untrusted(signed.body), author=ALICE.peer_id.raw)
    assert reason(reseal(signed, body, MALLORY, KEY)) is Rejection.AUTHOR


def test_state_in_another_peers_name_is_invalid() -> None:
    # Mallory's own validly signed delta that bumps Alice's counter total.
    op = Op(DocKind.COUNTER, "steps", PNCounter({ALICE.peer_id.raw: 99}))
    assert reason(seal(MALLORY, KEY, 1, (op,)).blob) is Rejection.INVALID
    lww = Op(DocKind.MAP, "run/abc", LwwMap.set_delta("k", 1, Timestamp(5, 0, ALICE.peer_id.raw)))
    assert reason(seal(MALLORY, KEY, 1, (lww,)).blob) is Rejection.INVALID
    add = Op(DocKind.ORSET, "roster", ORSet().add_delta("x", ALICE.peer_id.raw))
    assert reason(seal(MALLORY, KEY, 1, (add,)).blob) is Rejection.INVALID


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.data())
def test_garbage_raises_only_protocol_error(junk: bytes, data: st.DataObject) -> None:
    blob = bytearray(seal(ALICE, KEY, 3, (map_op(ALICE, {"a": [1, 2]}),)).blob)
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    for candidate in (junk, bytes(blob)):
        try:
            result = verify_untrusted(candidate, KEY)
        except ProtocolError:
            continue
        assert isinstance(result, Delta)


def test_oversized_ops_refused_at_seal() -> None:
    ops = tuple(map_op(ALICE, b"x" * 60_000) for _ in range(5))
    with pytest.raises(ValueError):
        seal(ALICE, KEY, 1, ops)


def test_author_is_implicit_in_delta_peer_tables() -> None:
    delta = seal(ALICE, KEY, 1, (map_op(ALICE),))
    body = decode_untrusted(decode_untrusted(delta.blob).body)
    assert body.ops[0].map.peers == ()  # the author's id is only in the signed body
    assert body.ops[0].map.entries[0].peer == 0
    assert verify_untrusted(delta.blob, KEY).ops == delta.ops
