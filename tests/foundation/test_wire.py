"""Wire format: schema round trips, limits, and fuzzing of the untrusted door."""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peerd.handshake
import peerd.rpc
from peerd.errors import ProtocolError
from peerd.wire import (
    FRAME_HEADER,
    FrameDecoder,
    Limits,
    decode_untrusted,
    encode,
    encode_frame,
    message,
    registered_types,
)


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


@message(990)
@dataclass(frozen=True)
class Inner:
    name: str
    blob: bytes


@message(991)
@dataclass(frozen=True)
class Outer:
    n: int
    ratio: float
    flag: bool
    color: Color
    items: tuple[Inner, ...]
    meta: dict[str, int]
    maybe: int | None
    pair: tuple[int, str]

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


SAMPLE = Outer(3, 0.5, True, Color.BLUE, (Inner("a", b"\x00\x01"),), {"k": 1}, None, (1, "x"))


def test_roundtrip() -> None:
    assert decode_untrusted(encode(SAMPLE)) == SAMPLE
    assert decode_untrusted(encode(SAMPLE), expect=Outer) == SAMPLE


def test_wrong_expected_type_and_version() -> None:
    with pytest.raises(ProtocolError, match="expected Inner"):
        decode_untrusted(encode(SAMPLE), expect=Inner)
    body = msgpack.packb([99, 991])
    with pytest.raises(ProtocolError, match="version"):
        decode_untrusted(body)
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_untrusted(msgpack.packb([1, 12345]))


def test_field_type_and_validation_errors() -> None:
    fields = list(msgpack.unpackb(encode(SAMPLE)))
    for index, bad in [(2, "3"), (4, 1), (5, 9), (6, [[1, 2]]), (7, {1: 1}), (8, "x")]:
        mutated = list(fields)
        mutated[index] = bad
        with pytest.raises(ProtocolError):
            decode_untrusted(msgpack.packb(mutated))
    mutated = list(fields)
    mutated[2] = -1  # rejected by __post_init__
    with pytest.raises(ProtocolError, match="n must be"):
        decode_untrusted(msgpack.packb(mutated))


def test_limits() -> None:
    tight = Limits(max_frame=64, max_depth=3, max_items=4, max_str=8, max_bin=8)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_untrusted(b"\x90" * 65, tight)
    with pytest.raises(ProtocolError):
        decode_untrusted(msgpack.packb([1, 990, "a" * 9, b""]), tight)
    with pytest.raises(ProtocolError):
        decode_untrusted(msgpack.packb([1, 990, "a", b"b" * 9]), tight)
    with pytest.raises(ProtocolError):
        decode_untrusted(msgpack.packb([1, 2, 3, 4, 5]), tight)
    with pytest.raises(ProtocolError, match="nesting"):
        decode_untrusted(msgpack.packb([1, [[[[[1]]]]]]), tight)


def test_frame_decoder_splits_and_bounds() -> None:
    frames = encode_frame(SAMPLE) + encode_frame(Inner("b", b""))
    dec = FrameDecoder()
    out = []
    for i in range(0, len(frames), 3):
        out += dec.feed(frames[i : i + 3])
    assert [decode_untrusted(b) for b in out] == [SAMPLE, Inner("b", b"")]
    assert dec.buffered == 0
    small = FrameDecoder(Limits(max_frame=10))
    with pytest.raises(ProtocolError, match="exceeds"):
        small.feed(FRAME_HEADER.pack(11))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_untrusted(data)


def _valid_bodies() -> list[bytes]:
    return [encode(SAMPLE), encode(Inner("z", b"q" * 20)),
            encode(peerd.rpc.RpcRequest("m", 5, False, b"p")),
            encode(peerd.handshake.ClientFinish(b"s" * 64, b"m" * 32))]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_valid_bodies()), st.lists(st.tuples(st.integers(0, 10_000),
                                                            st.integers(0, 255)), max_size=6),
       st.integers(0, 64))
def test_mutated_frames_only_protocol_error(body: bytes, flips: list[tuple[int, int]],
                                            cut: int) -> None:
    data = bytearray(body)
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: max(0, len(data) - cut)] if cut % 3 == 0 else data
    with contextlib.suppress(ProtocolError):
        decode_untrusted(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                    | st.text(max_size=8) | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                         max_size=4),
                    max_leaves=20),
       st.sampled_from(sorted(registered_types())))
def test_structured_garbage_for_every_type(payload: object, type_id: int) -> None:
    body = msgpack.packb([1, type_id, payload, payload], use_bin_type=True)
    with contextlib.suppress(ProtocolError):
        decode_untrusted(body)
