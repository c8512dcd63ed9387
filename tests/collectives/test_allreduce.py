"""Engine all-reduce over the in-memory fabric: correctness and bit-identity."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import trio
import trio.testing

from collectives.api import AllReduceResult, Quant, ReduceOp
from collectives.quant import RawCodec
from collectives.run import Engine
from peerd.errors import ConfigError
from tests.collectives.conftest import FAST, ids, inputs, reference, same_bytes, swarm


@pytest.mark.parametrize(
    ("size", "n"),
    [(2, 1), (2, 1000), (3, 7), (3, 101), (4, 3), (4, 997), (8, 1), (8, 5), (8, 333)],
)
@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.AVG])
async def test_matches_float64_and_is_identical_everywhere(
    mock_clock: trio.testing.MockClock, size: int, n: int, op: ReduceOp
) -> None:
    async with swarm(size) as s:
        data = inputs(s.alive(), n, seed=size * 1000 + n)
        arrays = {p: v.copy() for p, v in data.items()}
        results = await s.each(lambda p, e: e.all_reduce(arrays[p], op))
        want = reference(data, s.alive(), op is ReduceOp.AVG)
        for p, r in results.items():
            assert isinstance(r, AllReduceResult)
            assert r.participants == tuple(ids(size)) and r.revision == 0 and r.attempts == 1
            np.testing.assert_allclose(arrays[p], want, rtol=1e-5, atol=1e-5 * size)
        assert same_bytes(list(arrays.values()))
        if size > 1:
            assert all(r.bytes_sent > 0 and r.bytes_received > 0 for r in results.values())
        assert s.net.pending_data(b"ar/") == 0


async def test_worker_threads_give_the_same_bytes_as_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Real clock: 4 x 3M fp32 gives 1 MiB blocks, reduced and copied out on
    # worker threads when they are on.
    n = 3_000_017
    outcomes = []
    where: list[bool] = []  # per reduction: on the event loop's thread?
    accumulate = RawCodec.accumulate

    def spy(self: RawCodec, *args: Any) -> None:
        where.append(threading.current_thread() is threading.main_thread())
        accumulate(self, *args)

    monkeypatch.setattr(RawCodec, "accumulate", spy)
    for threads in (False, True):
        where.clear()
        config = replace(FAST, sub_chunk_bytes=0, worker_threads=threads)
        async with swarm(4, config) as s:
            data = inputs(s.alive(), n, seed=11)
            arrays = {p: v.copy() for p, v in data.items()}
            with trio.fail_after(60):
                await s.each(lambda p, e, a=arrays: e.all_reduce(a[p]))
            np.testing.assert_allclose(arrays["p00"], reference(data, s.alive(), True),
                                       rtol=1e-5, atol=1e-5)
            assert same_bytes(list(arrays.values()))
            outcomes.append(arrays["p00"].tobytes())
        assert where and all(where) is not threads
    assert outcomes[0] == outcomes[1]


async def test_reruns_are_bit_identical_whatever_the_timing(
    mock_clock: trio.testing.MockClock,
) -> None:
    outcomes = []
    for latencies in ([0.0] * 4, [0.3, 0.01, 0.2, 0.05]):
        async with swarm(4) as s:
            peers = s.alive()
            for i, lat in enumerate(latencies):
                s.net.set_link(peers[i], peers[(i + 1) % 4], latency=lat, bandwidth=1e5 * (i + 1))
            arrays = inputs(peers, 517, seed=7)
            await s.each(lambda p, e, a=arrays: e.all_reduce(a[p]))
            outcomes.append(arrays["p00"].tobytes())
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_torch_tensors_in_place(
    mock_clock: trio.testing.MockClock, dtype: torch.dtype
) -> None:
    async with swarm(4) as s:
        gen = torch.Generator().manual_seed(3)
        src = {p: torch.randn(9, 13, generator=gen) for p in s.alive()}
        tensors = {p: t.to(dtype) for p, t in src.items()}
        before = {p: t.data_ptr() for p, t in tensors.items()}
        await s.each(lambda p, e: e.all_reduce(tensors[p], "avg"))
        want = sum(t.to(dtype).double() for t in src.values()) / 4
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        for p, t in tensors.items():
            assert t.dtype == dtype and t.data_ptr() == before[p]
            torch.testing.assert_close(t.double(), want, rtol=tol, atol=tol)
        assert same_bytes([t.view(torch.int16).numpy() for t in tensors.values()])


async def test_concurrent_tags(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        tags = {"grads": 100, "stats": 7, "ema": 1}
        data = {t: inputs(s.alive(), n, seed=len(t)) for t, n in tags.items()}
        arrays = {t: {p: v.copy() for p, v in d.items()} for t, d in data.items()}

        async def three(p: str, e: Engine) -> None:
            async with trio.open_nursery() as nursery:
                for t in tags:
                    nursery.start_soon(lambda t=t: e.all_reduce(arrays[t][p], tag=t))

        await s.each(three)
        for t in tags:
            want = reference(data[t], s.alive(), True)
            for p in s.alive():
                np.testing.assert_allclose(arrays[t][p], want, rtol=1e-5, atol=1e-6)
            assert same_bytes(list(arrays[t].values()))


async def test_same_tag_twice_at_once_is_refused(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(2) as s:
        e = s.engines["p00"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: e.all_reduce(np.ones(4, np.float32), tag="x"))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ConfigError):
                await e.all_reduce(np.ones(4, np.float32), tag="x")
            nursery.start_soon(lambda: s.engines["p01"].all_reduce(np.ones(4, np.float32), tag="x"))
        # the first call finished: the tag is free again
        r = await s.each(lambda p, en: en.all_reduce(np.ones(4, np.float32), tag="x"))
        assert all(isinstance(v, AllReduceResult) for v in r.values())


@pytest.mark.parametrize(
    # int8 blocks carry an 8-byte header per sub-chunk: 16 elements here -> 64/24 bytes
    ("quant", "ratio"),
    [(Quant.FP16, 2), (Quant.BF16, 2), (Quant.INT8, 64 / 24)],
)
async def test_quantized_within_bounds_and_identical(
    mock_clock: trio.testing.MockClock, quant: Quant, ratio: float
) -> None:
    async with swarm(4) as s:
        data = inputs(s.alive(), 4000, seed=11)
        plain = {p: v.copy() for p, v in data.items()}
        packed = {p: v.copy() for p, v in data.items()}
        r_plain = await s.each(lambda p, e: e.all_reduce(plain[p], "sum", tag="plain"))
        r_q = await s.each(lambda p, e: e.all_reduce(packed[p], "sum", tag="q", quant=quant))
        want = reference(data, s.alive(), False)
        err = np.abs(packed["p00"] - want).max()
        if quant is Quant.INT8:
            # each of 4 quantizations (3 partial hops + the final) errs by at most half a
            # step of its block's range; partial sums of 4 normals stay within +-4*max|x|
            step = 2 * 4 * max(np.abs(v).max() for v in data.values()) / 255
            assert err <= 4 * step / 2
        else:
            rel = 2**-10 if quant is Quant.FP16 else 2**-7
            assert err <= 4 * rel * np.abs(want).max() * 2
        assert err > 0  # it really was quantized
        assert same_bytes(list(packed.values()))
        sent_plain = sum(r.bytes_sent for r in r_plain.values())
        sent_q = sum(r.bytes_sent for r in r_q.values())
        assert sent_plain / sent_q == pytest.approx(ratio, rel=0.01)


async def test_single_member_run(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(1) as s:
        a = np.arange(5, dtype=np.float32)
        r = await s.engines["p00"].all_reduce(a, "avg")
        assert r.participants == ("p00",) and np.array_equal(a, np.arange(5))
        assert r.bytes_sent == 0


async def test_needs_a_view(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(1) as s:
        lone = await s.start("q", None)
        with pytest.raises(ConfigError):
            await lone.all_reduce(np.ones(3, np.float32))
        with pytest.raises(ConfigError):
            await s.engines["p00"].all_reduce(np.ones(3, np.float32), op="max")
