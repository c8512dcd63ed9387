"""All-reduce into a separate destination (``out=``): the same bytes as in
place, the input only read, the ring in the destination's own memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import trio
import trio.testing

from collectives import allreduce
from collectives.api import AllReduceResult, Quant, ReduceOp
from collectives.arrays import destination, flatten
from collectives.scratch import POOL
from peerd.errors import ConfigError, PeerLost
from tests.collectives.conftest import inputs, reference, same_bytes, swarm
from tests.collectives.test_faults import kill_on_first


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("quant", [Quant.NONE, Quant.INT8, Quant.BF16])
@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.AVG])
async def test_out_gets_the_in_place_bytes_and_the_input_is_only_read(
    mock_clock: trio.testing.MockClock, quant: Quant, op: ReduceOp
) -> None:
    async with swarm(4) as s:
        data = inputs(s.alive(), 1003, seed=21)
        in_place = {p: v.copy() for p, v in data.items()}
        await s.each(lambda p, e: e.all_reduce(in_place[p], op, tag="a", quant=quant))
        # Read-only inputs: the ring never writes them.
        sources = {p: _read_only(v.copy()) for p, v in data.items()}
        outs = {p: np.full_like(v, np.nan) for p, v in data.items()}
        results = await s.each(
            lambda p, e: e.all_reduce(sources[p], op, tag="b", quant=quant, out=outs[p]))
        assert all(isinstance(r, AllReduceResult) for r in results.values()), results
        for p in s.alive():
            assert np.array_equal(sources[p], data[p])
            assert outs[p].tobytes() == in_place[p].tobytes()
        assert same_bytes(list(outs.values()))
        if quant is Quant.NONE:
            np.testing.assert_allclose(outs["p00"], reference(data, s.alive(), op is ReduceOp.AVG),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_torch_out(mock_clock: trio.testing.MockClock, dtype: torch.dtype) -> None:
    async with swarm(3) as s:
        gen = torch.Generator().manual_seed(4)
        src = {p: torch.randn(7, 11, generator=gen).to(dtype) for p in s.alive()}
        keep = {p: t.clone() for p, t in src.items()}
        outs = {p: torch.empty_like(t) for p, t in src.items()}
        await s.each(lambda p, e: e.all_reduce(src[p], "avg", out=outs[p]))
        await s.each(lambda p, e: e.all_reduce(keep[p], "avg"))
        for p in s.alive():
            assert torch.equal(outs[p].view(torch.int16), keep[p].view(torch.int16))


async def test_an_unquantized_ring_runs_in_out_and_copies_nothing(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_scratch(nbytes: int) -> np.ndarray:
        raise AssertionError("the ring took a scratch buffer")

    def no_copy(*args: Any) -> None:
        raise AssertionError("the result was copied")

    async with swarm(4) as s:
        data = inputs(s.alive(), 4099, seed=8)
        outs = {p: np.zeros_like(v) for p, v in data.items()}
        monkeypatch.setattr(POOL, "take", no_scratch)
        monkeypatch.setattr(allreduce.RawCodec, "decode_into", no_copy)
        await s.each(lambda p, e: e.all_reduce(data[p], "sum", out=outs[p]))
        np.testing.assert_allclose(outs["p01"], reference(data, s.alive(), False),
                                   rtol=1e-5, atol=1e-4)
        assert same_bytes(list(outs.values()))


@pytest.mark.parametrize("phase", [b"r", b"g"])
async def test_a_kill_mid_ring_leaves_every_input_intact_and_retry_fills_out(
    mock_clock: trio.testing.MockClock, phase: bytes
) -> None:
    async with swarm(4) as s:
        kill_on_first(s, "p02", phase)
        data = inputs(s.alive(), 211, seed=5)
        sources = {p: v.copy() for p, v in data.items()}
        outs = {p: np.full_like(v, np.nan) for p, v in data.items()}
        results = await s.each(lambda p, e: e.all_reduce(sources[p], "avg", out=outs[p]))
        survivors = s.alive()
        assert "p02" not in survivors and sorted(results) == survivors
        want = reference(data, survivors, True)
        for p in survivors:
            r = results[p]
            assert isinstance(r, AllReduceResult) and r.attempts == 2, results
            assert sorted(r.participants) == survivors
            assert np.array_equal(sources[p], data[p])
            np.testing.assert_allclose(outs[p], want, rtol=1e-5, atol=1e-6)
        assert same_bytes([outs[p] for p in survivors])


async def test_without_retry_a_kill_raises_and_the_input_is_intact(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        kill_on_first(s, "p01", b"g")
        data = inputs(s.alive(), 301, seed=6)
        sources = {p: v.copy() for p, v in data.items()}
        outs = {p: np.zeros_like(v) for p, v in data.items()}
        results = await s.each(
            lambda p, e: e.all_reduce(sources[p], "avg", retry=False, out=outs[p]))
        assert sorted(results) == ["p00", "p02"]
        for p, r in results.items():
            assert isinstance(r, PeerLost) and "p01" in r.peers, results
            assert np.array_equal(sources[p], data[p])


def test_out_must_match_the_input() -> None:
    a = flatten(np.zeros(6, np.float32))
    with pytest.raises(ConfigError, match=r"out holds 5 float32 elements but the input 6 "
                                          r"float32: pass an out of the input's size and dtype"):
        destination(a, np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match="out holds 6 float16"):
        destination(a, np.zeros(6, np.float16))
    with pytest.raises(ConfigError, match="read-only"):
        destination(a, _read_only(np.zeros(6, np.float32)))
    with pytest.raises(ConfigError, match="C-contiguous"):
        destination(a, np.zeros(12, np.float32)[::2])


def test_out_is_the_input_or_apart_from_it() -> None:
    buf = np.zeros(12, np.float32)
    flat = flatten(buf[:6])
    assert destination(flat, None) is flat
    assert destination(flat, buf[:6].reshape(2, 3)) is flat  # the same memory: in place
    assert destination(flat, buf[6:]).data.base is buf  # apart: a destination of its own
    with pytest.raises(ConfigError, match="overlaps the input without being it"):
        destination(flat, buf[3:9])


async def test_the_engine_refuses_a_bad_out_before_the_round(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(2) as s:
        engine = s.engines["p00"]
        with pytest.raises(ConfigError, match="out holds 3"):
            await engine.all_reduce(np.ones(4, np.float32), out=np.ones(3, np.float32))
        with pytest.raises(ConfigError, match="read-only"):
            await engine.all_reduce(_read_only(np.ones(4, np.float32)))
        assert engine.counters["all_reduces"] == 0


@pytest.mark.parametrize("array", [np.zeros(3, np.int64), np.zeros(3, np.float64),
                                   torch.zeros(3, dtype=torch.int64)])
def test_other_dtypes_are_refused_with_the_conversion_to_make(array: object) -> None:
    with pytest.raises(ConfigError, match=r"needs float32, float16 or bfloat16 elements, got "
                                          r"(torch\.)?(int64|float64): convert it first"):
        flatten(array)
