"""The in-place ring: accumulate into received blocks, receive into place, sub-chunk sizes."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collectives.api import Quant
from collectives.arrays import Kind, flatten
from collectives.chunking import Span
from collectives.driver import (
    AUTO_SUB_MAX,
    AUTO_SUB_MAX_LOOP,
    AUTO_SUB_MIN,
    AUTO_SUB_SPLIT,
    EngineConfig,
    sub_chunk_elems,
)
from collectives.memfabric import MemNetwork
from collectives.quant import Codec, codec_for
from peerd.errors import PeerLost
from tests.collectives.conftest import inputs, reference, same_bytes, swarm

values = st.floats(-1e4, 1e4, width=32)


@given(
    hnp.arrays(np.float32, st.integers(0, 200), elements=values),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 3, 8]),
    st.sampled_from(list(Quant)),
)
@settings(max_examples=60)
def test_accumulate_matches_decode_add_encode(
    partial: np.ndarray, seed: int, divisor: int, quant: Quant
) -> None:
    mine = np.random.default_rng(seed).standard_normal(partial.size).astype(np.float32)
    codec = codec_for(quant, Kind.F32)
    span = Span(0, partial.size)
    block = bytearray(codec.wire_size(partial.size))
    codec.encode(partial, memoryview(block))
    generic = bytearray(block)
    codec.accumulate(memoryview(block), flatten(mine), span, divisor)
    Codec.accumulate(codec, memoryview(generic), flatten(mine), span, divisor)
    assert block == generic  # the fast path is the same IEEE arithmetic, bit for bit


def test_accumulate_refuses_a_block_of_the_wrong_size() -> None:
    codec = codec_for(Quant.NONE, Kind.F32)
    with pytest.raises(ValueError, match="block of"):
        codec.accumulate(memoryview(bytearray(12)), flatten(np.ones(4, np.float32)), Span(0, 4))


async def test_memfabric_receives_into_a_buffer_and_blames_a_size_mismatch() -> None:
    net = MemNetwork()
    a, b = net.add("a"), net.add("b")
    await a.send_data("b", b"k1", b"abcd")
    await a.send_data("b", b"k2", b"abc")
    out = bytearray(4)
    await b.recv_data_into("a", b"k1", memoryview(out))
    assert out == b"abcd"
    with pytest.raises(PeerLost) as err:
        await b.recv_data_into("a", b"k2", memoryview(bytearray(4)))
    assert set(err.value.peers) == {"a"}


def test_explicit_sub_chunk_size_is_kept() -> None:
    cfg = EngineConfig(sub_chunk_bytes=64)
    assert sub_chunk_elems(cfg, 10**9, 4) == 16
    assert sub_chunk_elems(cfg, 3, 4) == 16


@given(st.integers(0, 10**9), st.integers(1, 64), st.booleans())
@settings(max_examples=200)
def test_automatic_sub_chunks_are_a_bounded_share_of_a_chunk(
    n: int, peers: int, threads: bool
) -> None:
    elems = sub_chunk_elems(EngineConfig(worker_threads=threads), n, peers)
    # With worker threads a chunk is split (reducing overlaps the transfer);
    # on the event loop alone it goes whole, up to a larger bound.
    split, most = (AUTO_SUB_SPLIT, AUTO_SUB_MAX) if threads else (1, AUTO_SUB_MAX_LOOP)
    assert AUTO_SUB_MIN // 4 <= elems <= most // 4
    chunk = -(-n // peers)
    if AUTO_SUB_MIN // 4 < elems < most // 4:
        assert elems == 4 * chunk // split // 4


class _NoCopyReceives:
    """Wraps a MemFabric; fails the test if a ring block (reduce-scatter ``/r/``
    or all-gather ``/g/``) is received by the copying ``recv_data``."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def recv_data(self, peer: str, key: bytes) -> bytes:
        if key.startswith(b"ar/") and (b"/r/" in key or b"/g/" in key):
            raise AssertionError(f"ring block {key!r} received by copy")
        return await self._inner.recv_data(peer, key)  # type: ignore[attr-defined, no-any-return]


async def test_ring_blocks_land_in_place_and_results_stay_identical(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(4) as s:
        for peer, engine in s.engines.items():
            engine.fabric = _NoCopyReceives(s.fabrics[peer])  # type: ignore[assignment]
        data = inputs(s.alive(), 1001, seed=5)
        arrays = {p: v.copy() for p, v in data.items()}
        await s.each(lambda p, e: e.all_reduce(arrays[p], "sum"))
        want = reference(data, s.alive(), False)
        for got in arrays.values():
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert same_bytes(list(arrays.values()))
