"""Signed records, their validation, the store's rules and replica merging."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.dht.records import (
    NODE_RECORD_SUBKEY,
    Record,
    RecordLimits,
    Reject,
    make_record,
    merge_records,
    owned_subkey,
    split_subkey,
    validate,
)
from peerd.dht.sim import sim_identity
from peerd.dht.storage import RecordStore
from peerd.identity import Identity

KEY = hashlib.sha256(b"run/alpha").digest()
NOW = 1000.0


def _id(n: int) -> Identity:
    return sim_identity(f"test-{n}")


def ns(n: int, suffix: bytes) -> bytes:
    """``suffix`` in identity ``n``'s sub-key namespace."""
    return owned_subkey(_id(n).peer_id.raw, suffix)


def rec(n: int = 1, value: object = "v", *, subkey: bytes | None = None, ttl: float = 600.0,
        seq: int = 1, key: bytes = KEY, now: float = NOW) -> Record:
    """A valid record by identity ``n``; ``subkey`` is a suffix in ``n``'s namespace."""
    full = ns(n, subkey) if subkey is not None else None
    return make_record(_id(n), key, value, ttl=ttl, now=now, subkey=full, seq=seq)


def claim(thief: int, owner: int, suffix: bytes, value: object = "stolen", *,
          seq: int = 2**40) -> Record:
    """A correctly signed record by ``thief`` in ``owner``'s sub-key namespace."""
    return make_record(_id(thief), KEY, value, ttl=600.0, now=NOW, subkey=ns(owner, suffix),
                       seq=seq)


def test_valid_record_passes_and_value_round_trips() -> None:
    r = rec(value={"addr": ["1.2.3.4:5"], "n": 3})
    assert validate(r, NOW) is None
    assert r.decoded_value() == {"addr": ["1.2.3.4:5"], "n": 3}


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda r: dataclasses.replace(r, value=r.value + b"\x01"), Reject.BAD_SIGNATURE),
        (lambda r: dataclasses.replace(r, seq=r.seq + 1), Reject.BAD_SIGNATURE),
        (lambda r: dataclasses.replace(r, subkey=ns(1, b"other")), Reject.BAD_SIGNATURE),
        (lambda r: dataclasses.replace(r, subkey=ns(9, b"other")), Reject.SUBKEY_NOT_OWNED),
        (lambda r: dataclasses.replace(r, signature=bytes(64)), Reject.BAD_SIGNATURE),
        (lambda r: dataclasses.replace(r, expires_at=r.expires_at + 1), Reject.BAD_SIGNATURE),
        (lambda r: dataclasses.replace(r, publisher=_id(9).peer_id.raw),
         Reject.PUBLISHER_MISMATCH),
        (lambda r: dataclasses.replace(r, public_key=_id(9).public_key),
         Reject.PUBLISHER_MISMATCH),
    ],
)
def test_tampered_records_are_rejected(forge: object, reason: Reject) -> None:
    assert validate(forge(rec()), NOW) is reason  # type: ignore[operator]


def test_expired_oversized_and_too_long_lived_records_are_rejected() -> None:
    assert validate(rec(ttl=10.0), NOW + 10.0) is Reject.EXPIRED
    assert validate(rec(value="x" * 5000), NOW) is Reject.OVERSIZED
    # 64 bytes of the caller's own fit after the 32-byte publisher prefix, 65 do not.
    assert validate(rec(subkey=b"s" * 64), NOW) is None
    assert validate(rec(subkey=b"s" * 65), NOW) is Reject.OVERSIZED
    limits = RecordLimits(max_ttl=3600.0, clock_skew=0.0)
    assert validate(rec(ttl=3601.0), NOW, limits) is Reject.TTL_TOO_LONG


def test_node_record_slot_is_reserved_for_its_peer() -> None:
    own = make_record(_id(1), _id(1).peer_id.raw, ["a"], ttl=60, now=NOW,
                      subkey=NODE_RECORD_SUBKEY)
    assert validate(own, NOW) is None
    squat = make_record(_id(2), _id(1).peer_id.raw, ["evil"], ttl=60, now=NOW,
                        subkey=NODE_RECORD_SUBKEY)
    assert validate(squat, NOW) is Reject.RESERVED_SUBKEY


def test_garbage_value_bytes_are_rejected_even_when_signed() -> None:
    from peerd.dht.records import signing_bytes

    ident = _id(1)
    value = b"\xc1"  # never-used msgpack byte
    args = (KEY, None, value, ident.peer_id.raw, ident.public_key, 1, NOW + 60)
    r = Record(*args, signature=ident.sign(signing_bytes(*args)))
    assert validate(r, NOW) is Reject.BAD_VALUE


def test_subkey_must_start_with_its_publisher_id() -> None:
    assert validate(rec(1, subkey=b"member"), NOW) is None
    assert validate(rec(1, subkey=b""), NOW) is None  # the bare peer id is a sub-key too
    bare = make_record(_id(1), KEY, "v", ttl=600.0, now=NOW, subkey=b"member")
    assert validate(bare, NOW) is Reject.SUBKEY_NOT_OWNED
    assert validate(claim(2, 1, b"member"), NOW) is Reject.SUBKEY_NOT_OWNED
    # Prefix-looking but truncated ids do not count.
    short = make_record(_id(1), KEY, "v", ttl=600.0, now=NOW, subkey=_id(1).peer_id.raw[:31])
    assert validate(short, NOW) is Reject.SUBKEY_NOT_OWNED


def test_forged_claim_is_refused_by_a_node_that_never_saw_the_owner() -> None:
    fresh = RecordStore()
    assert fresh.store(claim(2, 1, b"member"), NOW) is Reject.SUBKEY_NOT_OWNED
    assert fresh.get(KEY, NOW) == [] and len(fresh) == 0
    # The owner's record arrives later (at a far lower seq) and takes its slot.
    assert fresh.store(rec(1, "mine", subkey=b"member"), NOW) is None
    assert fresh.store(claim(2, 1, b"member", seq=2**50), NOW) is Reject.SUBKEY_NOT_OWNED
    assert [r.decoded_value() for r in fresh.get(KEY, NOW)] == ["mine"]
    assert fresh.rejections() == {Reject.SUBKEY_NOT_OWNED: 2}


def test_plain_slot_keeps_its_first_claim_until_expiry() -> None:
    store = RecordStore()
    assert store.store(rec(1, "mine"), NOW) is None
    assert store.store(rec(2, "theirs"), NOW) is Reject.SUBKEY_OWNED
    assert store.store(rec(2, "own slot", subkey=b"member"), NOW) is None
    [kept] = [r for r in store.get(KEY, NOW) if r.subkey is None]
    assert kept.decoded_value() == "mine"
    # Once the first claim has expired the plain slot is free again.
    later = NOW + 601.0
    assert store.store(rec(2, "theirs", now=later), later) is None


def test_owned_and_split_subkey_round_trip() -> None:
    me = _id(1).peer_id
    full = owned_subkey(me.raw, b"member")
    assert full == me.raw + b"member"
    assert owned_subkey(me.raw, full) == full  # already in the namespace: unchanged
    assert split_subkey(full) == (me, b"member")
    assert split_subkey(me.raw) == (me, b"")
    for bad in (NODE_RECORD_SUBKEY, b"short"):
        with pytest.raises(ValueError):
            split_subkey(bad)
    with pytest.raises(ValueError):
        owned_subkey(b"not an id", b"member")


@settings(max_examples=60, deadline=None)
@given(suffix=st.binary(max_size=64), owner=st.integers(1, 4), writer=st.integers(1, 4))
def test_only_the_namespace_owner_may_write_a_subkey(suffix: bytes, owner: int,
                                                     writer: int) -> None:
    record = make_record(_id(writer), KEY, 1, ttl=60.0, now=NOW, subkey=ns(owner, suffix))
    expected = None if owner == writer else Reject.SUBKEY_NOT_OWNED
    assert validate(record, NOW) is expected
    assert RecordStore().store(record, NOW) is expected


def test_store_replaces_only_with_newer_seq_from_same_publisher() -> None:
    store = RecordStore()
    assert store.store(rec(1, "v1", seq=5), NOW) is None
    assert store.store(rec(1, "old", seq=4), NOW) is Reject.STALE
    assert store.store(rec(1, "v2", seq=6), NOW) is None
    assert [r.decoded_value() for r in store.get(KEY, NOW)] == ["v2"]
    assert len(store) == 1


def test_store_quota_per_publisher_and_total() -> None:
    store = RecordStore(RecordLimits(max_records_per_publisher=3, max_records=5))
    for i in range(3):
        assert store.store(rec(1, i, subkey=b"%d" % i), NOW) is None
    assert store.store(rec(1, 9, subkey=b"9"), NOW) is Reject.QUOTA
    assert store.store(rec(1, "update", subkey=b"0", seq=2), NOW) is None  # same slot is fine
    assert store.store(rec(2, 0, subkey=b"a"), NOW) is None
    assert store.store(rec(3, 0, subkey=b"b"), NOW) is None
    assert store.store(rec(4, 0, subkey=b"c"), NOW) is Reject.FULL


def test_store_rejects_forgeries_and_never_returns_them() -> None:
    store = RecordStore()
    good = rec(1, "good")
    forged = [
        dataclasses.replace(rec(2, "x"), value=rec(2, "y").value),
        dataclasses.replace(rec(2, "x"), publisher=_id(1).peer_id.raw),
        rec(2, "z" * 5000),
        rec(2, "old", ttl=1.0, now=NOW - 10.0),
    ]
    assert store.store(good, NOW) is None
    for f in forged:
        assert store.store(f, NOW) is not None
    assert store.get(KEY, NOW) == [good]
    assert store.statistics().rejected == len(forged)


def test_expire_drops_dead_records_and_frees_quota() -> None:
    store = RecordStore(RecordLimits(max_records_per_publisher=1))
    assert store.store(rec(1, "a", ttl=10.0), NOW) is None
    assert store.expire(NOW + 5.0) == 0
    assert store.expire(NOW + 10.0) == 1
    assert len(store) == 0 and store.get(KEY, NOW + 10.0) == []
    assert store.store(rec(1, "b", subkey=b"x", now=NOW + 10.0), NOW + 10.0) is None


def test_merge_keeps_each_publishers_latest_subkey_and_majority_plain_value() -> None:
    a1, a2 = rec(1, "a1", subkey=b"s", seq=1), rec(1, "a2", subkey=b"s", seq=2)
    b = rec(2, "b", subkey=b"s", seq=99)
    merged = merge_records([[b, a1], [a2], [a1]])
    assert merged == {ns(1, b"s"): a2, ns(2, b"s"): b}  # same suffix, two namespaces
    # The shared plain slot: the publisher most holders report wins, ties to the nearest.
    p1, p2 = rec(1, "p1"), rec(2, "p2", seq=99)
    assert merge_records([[p2], [p1], [p1]])[None] is p1
    assert merge_records([[p2], [p1]])[None] is p2
