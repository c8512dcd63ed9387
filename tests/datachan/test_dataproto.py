"""Pure data-protocol pieces: tokens, preamble, heads, stripes."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.dataproto import (
    DATA_VERSION,
    MAGIC,
    PREAMBLE_SIZE,
    TOKEN_SIZE,
    Part,
    PartTracker,
    TokenTable,
    choose_part_count,
    encode_head,
    encode_part,
    encode_preamble,
    parse_head,
    parse_part,
    parse_preamble,
    part_bounds,
)
from peerd.errors import ProtocolError
from peerd.record import Keying

KS = Keying(b"s" * 32)
KT = Keying(b"t" * 32, "aegis128x2")


def test_token_single_use_and_expiry() -> None:
    table = TokenTable()
    tok = table.issue("peer-a", KS, ttl=10.0, now=100.0)
    assert len(tok) == TOKEN_SIZE
    assert table.take(tok, now=105.0) == ("peer-a", KS)
    assert table.take(tok, now=105.0) is None  # reused
    old = table.issue("peer-b", KT, ttl=10.0, now=100.0)
    assert table.take(old, now=110.0) is None  # expired exactly at the deadline
    assert table.take(b"\0" * TOKEN_SIZE, now=0.0) is None  # never issued
    assert table.expired == 1


def test_token_table_is_bounded() -> None:
    table = TokenTable(max_tokens=3)
    toks = [table.issue("p", KS, ttl=5.0, now=float(i)) for i in range(5)]
    assert len(table) == 3
    assert table.take(toks[0], 5.0) is None and table.take(toks[1], 5.0) is None
    assert table.take(toks[4], 5.0) == ("p", KS)
    table.issue("p", KS, ttl=1.0, now=0.0)
    assert table.purge(now=100.0) == 3 and len(table) == 0


def test_preamble() -> None:
    tok = bytes(range(TOKEN_SIZE))
    pre = encode_preamble(tok)
    assert len(pre) == PREAMBLE_SIZE and parse_preamble(pre) == tok
    for bad in (pre[:-1], b"X" + pre[1:], MAGIC + bytes([DATA_VERSION + 1]) + tok):
        with pytest.raises(ProtocolError):
            parse_preamble(bad)


def test_head_roundtrip_and_limits() -> None:
    assert parse_head(encode_head(b"hdr", 12345), 1 << 20) == (b"hdr", 12345)
    with pytest.raises(ProtocolError):
        parse_head(encode_head(b"hdr", 1 << 21), 1 << 20)
    with pytest.raises(ProtocolError):
        parse_head(encode_head(b"hdr", 5) + b"x", 1 << 20)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**12), st.integers(1, 64), st.integers(1, 1 << 24))
def test_stripes_cover_payload_exactly(total: int, channels: int, part_size: int) -> None:
    count = choose_part_count(total, channels, part_size, min_part=1 << 16)
    assert count >= 1
    bounds = [part_bounds(i, count, total) for i in range(count)]
    assert bounds[0][0] == 0
    for (o1, l1), (o2, _) in itertools.pairwise(bounds):
        assert o1 + l1 == o2
    assert sum(n for _, n in bounds) == total
    if count < 1 << 16:
        assert max(n for _, n in bounds) <= part_size
    if total >= channels * (1 << 16):
        assert count >= channels  # every channel gets work


def test_part_roundtrip_and_validation() -> None:
    part = Part(b"key", 2, 4, *part_bounds(2, 4, 1000)[:1], 1000)
    hdr = encode_part(part)
    assert parse_part(hdr, 250, 1 << 20) == part
    with pytest.raises(ProtocolError):
        parse_part(hdr, 251, 1 << 20)  # length does not match the stripe
    with pytest.raises(ProtocolError):
        parse_part(hdr, 250, 999)  # total over the receiver's limit
    with pytest.raises(ProtocolError):
        parse_part(encode_part(Part(b"k", 4, 4, 0, 1000)), 0, 1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(0, 1 << 40))
def test_parsers_only_raise_protocol_error(data: bytes, n: int) -> None:
    for fn in (lambda: parse_part(data, n, 1 << 40), lambda: parse_head(data, 1 << 30),
               lambda: parse_preamble(data)):
        with contextlib.suppress(ProtocolError):
            fn()


def test_tracker_refuses_duplicates_and_disagreement() -> None:
    first = Part(b"k", 0, 2, 0, 10)
    tracker = PartTracker(first)
    tracker.begin(first)
    with pytest.raises(ProtocolError):
        tracker.begin(first)
    with pytest.raises(ProtocolError):
        tracker.begin(Part(b"k", 1, 3, 5, 10))
    tracker.begin(Part(b"k", 1, 2, 5, 10))
    assert tracker.finish() is False and tracker.finish() is True
