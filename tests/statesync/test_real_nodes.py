"""Real nodes on loopback (QUIC control, encrypted TCP data): state sync and
joining with striped download, custom collectives, quantized all-reduce, and
which work the default worker threads take on a host with cores to spare."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from collectives.allreduce import THREAD_MIN
from collectives.api import Quant, SyncResult, SyncStrategy
from collectives.driver import EngineConfig
from collectives.membership import Timing
from collectives.quant import RawCodec
from peerd import datachan
from peerd.datastream import DataChannel
from peerd.identity import SwarmKey
from peerd.node import Node, open_node

RUN = "state-run"
# All nodes of a test share one process and one event loop, and the machine is
# shared: allow for multi-second stalls instead of declaring peers gone.
PATIENT = EngineConfig(timing=Timing(heartbeat_interval=1.0, heartbeat_timeout=30.0,
                                     view_timeout=60.0))


@asynccontextmanager
async def mesh(n: int) -> AsyncIterator[list[Node]]:
    """``n`` connected nodes, all members of ``RUN`` from revision 0."""
    key = SwarmKey(os.urandom(32))
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_node(key)) for _ in range(n)]
        for i, a in enumerate(nodes):
            for b in nodes[:i]:
                await a.connect(b.listen_address)
        members = [x.peer_id.text for x in nodes]
        async with trio.open_nursery() as nursery:
            for x in nodes:
                nursery.start_soon(x.join_run, RUN, members, PATIENT)
        yield nodes


async def each(nodes: list[Node], fn):  # type: ignore[no-untyped-def]
    out: dict[int, object] = {}

    async def one(i: int, node: Node) -> None:
        out[i] = await fn(i, node)

    async with trio.open_nursery() as nursery:
        for i, node in enumerate(nodes):
            nursery.start_soon(one, i, node)
    return [out[i] for i in range(len(nodes))]


async def test_real_nodes_converge_and_exchange() -> None:
    with trio.fail_after(60):
        async with mesh(4) as nodes:
            rng = np.random.default_rng(0)
            base: dict[str, np.ndarray] = {"a": rng.standard_normal(70_000).astype(np.float32),
                    "b": rng.standard_normal(300_000).astype(np.float32),
                    "n": np.array([5], dtype=np.int64)}
            states = [{k: v.copy() for k, v in base.items()} for _ in nodes]
            states[1]["a"][0] = 9.0
            states[2]["b"][-1] = 9.0
            states[2]["n"][0] = 6
            res = await each(nodes, lambda i, x: x.sync_state(RUN, states[i], 3))
            for st in states:
                for k in base:
                    assert np.array_equal(st[k], base[k])
            assert res[1].tensors_received == ("a",)
            assert res[2].tensors_received == ("b", "n")
            assert len({r.participants for r in res}) == 1

            ragged = [np.arange(i * 3, dtype=np.float32) for i in range(4)]
            gathered = await each(nodes, lambda i, x: x.all_gather(RUN, ragged[i], tag="sp"))
            for arrays, peers in gathered:
                assert peers == nodes[0].view(RUN).members
                by_peer = dict(zip(peers, arrays, strict=True))
                for i, x in enumerate(nodes):
                    assert np.array_equal(by_peer[x.peer_id.text], ragged[i])

            msg = np.arange(1 << 20, dtype=np.float32)

            async def p2p(i: int, x: Node) -> object:
                if i == 0:
                    await x.send(RUN, nodes[3].peer_id, msg, tag="m")
                elif i == 3:
                    return await x.recv(RUN, nodes[0].peer_id, tag="m")
                return None

            got = await each(nodes, p2p)
            assert np.array_equal(got[3], msg)


async def join_with_holders(size: int) -> float:
    """3 holders with ``size`` fp32 parameters; a 4th node joins and downloads them.
    Returns the joiner's sync time in seconds."""
    # Made before the nodes start: a second of numpy here would stall them all.
    rng = np.random.default_rng(1)
    params = rng.standard_normal(size, dtype=np.float32)
    small = rng.standard_normal(1000).astype(np.float32)
    states = [{"params": params.copy(), "small": small.copy()} for _ in range(3)]
    mine = {"params": np.zeros(size, np.float32), "small": np.zeros(1000, np.float32)}
    async with mesh(3) as holders:
        await each(holders, lambda i, x: x.sync_state(RUN, states[i], 1))
        async with open_node(holders[0].swarm_key) as joiner:
            for h in holders:
                await joiner.connect(h.listen_address)
            out: dict[str, SyncResult] = {}
            took: list[float] = []

            async def join() -> None:
                await joiner.join_run(RUN, config=PATIENT)
                t0 = time.perf_counter()
                out["j"] = await joiner.sync_state(RUN, mine, 0, SyncStrategy.RECEIVE_ONLY)
                took.append(time.perf_counter() - t0)

            async def holder(i: int) -> None:
                out[str(i)] = await holders[i].sync_state(RUN, states[i], 2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(join)
                me = joiner.peer_id.text
                while not any(me in h.engine(RUN).core.joiners(trio.current_time())
                              for h in holders):
                    await trio.sleep(0.05)
                for i in range(3):
                    nursery.start_soon(holder, i)
            assert np.array_equal(mine["params"], params)
            assert np.array_equal(mine["small"], small)
            assert out["j"].bytes_received == params.nbytes + small.nbytes
            assert len(out["j"].participants) == 4
            shares = [out[str(i)].bytes_sent for i in range(3)]
            assert sum(shares) == out["j"].bytes_received
            assert min(shares) >= params.nbytes // 4  # striped over all three
            return took[0]


async def test_joiner_downloads_10m_params_from_three_holders() -> None:
    with trio.fail_after(120):
        await join_with_holders(10_000_000)


@pytest.mark.slow
async def test_joiner_downloads_100m_params_from_three_holders() -> None:
    with trio.fail_after(600):
        seconds = await join_with_holders(100_000_000)
        print(f"100M fp32 from 3 holders in one process: {seconds:.1f} s")


@pytest.mark.parametrize("quant", [Quant.NONE, Quant.FP16, Quant.BF16, Quant.INT8])
async def test_quantized_all_reduce_on_real_nodes(quant: Quant) -> None:
    with trio.fail_after(60):
        async with mesh(3) as nodes:
            rng = np.random.default_rng(7)
            data = [rng.standard_normal(200_000).astype(np.float32) for _ in nodes]
            work = [d.copy() for d in data]
            res = await each(nodes, lambda i, x: x.all_reduce(RUN, work[i], "sum", quant=quant))
            want = np.sum([d.astype(np.float64) for d in data], axis=0)
            err = float(np.abs(work[0] - want).max())
            n = len(nodes)
            if quant is Quant.NONE:
                assert err <= 1e-5 * np.abs(want).max()
            elif quant is Quant.INT8:
                # n quantizations (n-1 partial hops + the final), each off by at most
                # half a step of its block's range; partial sums stay within n*max|x|
                step = 2 * n * max(np.abs(d).max() for d in data) / 255
                assert 0 < err <= n * step / 2
            else:
                rel = 2**-10 if quant is Quant.FP16 else 2**-7
                assert 0 < err <= n * rel * np.abs(want).max() * 2
            assert len({w.tobytes() for w in work}) == 1  # identical bytes everywhere
            assert {r.participants for r in res} == {nodes[0].view(RUN).members}


async def test_many_cores_reduce_on_threads_and_move_messages_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The defaults where a process may use many cores and the native record
    # loops run: large ring blocks are reduced on worker threads, while every
    # data message is moved by the event loop (no I/O thread hop).
    monkeypatch.setattr(datachan, "usable_cores", lambda: 64)
    on_loop: list[bool] = []
    hops: list[int] = []
    accumulate = RawCodec.accumulate

    def spy(self: RawCodec, *args: Any) -> None:
        if len(args[0]) >= THREAD_MIN:  # smaller ones are added on the loop by design
            on_loop.append(threading.current_thread() is threading.main_thread())
        accumulate(self, *args)

    async def no_hop(self: DataChannel, fn: Any, *args: Any) -> None:
        hops.append(1)
        fn(*args)

    monkeypatch.setattr(RawCodec, "accumulate", spy)
    monkeypatch.setattr(DataChannel, "_in_thread", no_hop)
    with trio.fail_after(60):
        async with mesh(4) as nodes:
            rng = np.random.default_rng(5)
            data = [rng.standard_normal(3_000_017).astype(np.float32) for _ in nodes]
            work = [d.copy() for d in data]
            await each(nodes, lambda i, x: x.all_reduce(RUN, work[i], "avg"))
    want = np.mean([d.astype(np.float64) for d in data], axis=0)
    np.testing.assert_allclose(work[0], want, rtol=1e-5, atol=1e-6)
    assert len({w.tobytes() for w in work}) == 1
    assert on_loop and not any(on_loop)  # every large block reduced off the loop
    assert not hops  # and no message moved by an I/O thread
