"""Partitions: a swarm split in two, then healed (in-process, memory network, mock clock)."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import AllReduceResult
from peerd.errors import PeerLost
from tests.collectives.conftest import inputs, reference, same_bytes, swarm
from tests.crdt.cluster import open_cluster, wait_converged

BIG, SMALL = ["p00", "p01", "p02"], ["p03", "p04"]


def _split(s, a: list[str], b: list[str], heal: bool = False) -> None:  # type: ignore[no-untyped-def]
    for x in a:
        for y in b:
            (s.net.heal if heal else s.net.cut)(x, y)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def _round(s, seed: int):  # type: ignore[no-untyped-def]
    data = inputs(s.alive(), 257, seed=seed)
    arrays = {p: v.copy() for p, v in data.items()}
    with trio.fail_after(300):
        out = await s.each(lambda p, e: e.all_reduce(arrays[p], "avg", retry=True))
    return data, arrays, out


async def test_larger_side_keeps_working(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(5) as s:
        _split(s, BIG, SMALL)
        data, arrays, out = await _round(s, 1)
        big = {p: r for p, r in out.items() if p in BIG}
        assert all(isinstance(r, AllReduceResult) for r in big.values()), big
        assert all(sorted(r.participants) == BIG for r in big.values()), big
        np.testing.assert_allclose(arrays["p00"], reference(data, BIG, True), rtol=1e-5,
                                   atol=1e-6)
        assert same_bytes([arrays[p] for p in BIG])


async def test_smaller_side_stops(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(5) as s:
        _split(s, BIG, SMALL)
        _, _, out = await _round(s, 2)
        small = [out[p] for p in SMALL]
        assert not any(isinstance(r, AllReduceResult) for r in small), small
        assert all(isinstance(r, PeerLost) for r in small), small


@pytest.mark.xfail(strict=True, reason=(
    "after healing, the minority's engines stay on revision 0 and every all_reduce "
    "fails with PeerLost('no quorum: 2 of 5 members of revision 0 reachable'), while "
    "the majority went on at revision 1 without them; nothing re-admits a healed "
    "minority automatically (it must leave the run and join again)"))
async def test_views_reconverge_after_heal(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(5) as s:
        _split(s, BIG, SMALL)
        await _round(s, 3)
        _split(s, BIG, SMALL, heal=True)
        await trio.sleep(60)
        _, _, out = await _round(s, 4)
        assert all(isinstance(r, AllReduceResult) and len(r.participants) == 5
                   for r in out.values()), out


async def test_crdt_store_loses_no_acknowledged_write(mock_clock: trio.testing.MockClock) -> None:
    async with open_cluster(5, seed=4) as (net, nodes):
        ids = [n.identity.peer_id for n in nodes]
        net.partition(ids[:3], ids[3:])
        acked: dict[str, bytes] = {}
        for i, node in enumerate(nodes):
            for k in range(5):
                key, value = f"w{i}-{k}", f"v{i}-{k}".encode()
                node.store.doc("cfg").set(key, value)  # returns once committed locally
                acked[key] = value
            node.store.counter("steps").increment(3)
            await trio.sleep(0.5)
        # Both sides converge internally while apart, but not across.
        with trio.fail_after(120):
            await wait_converged([n.store for n in nodes[:3]])
            await wait_converged([n.store for n in nodes[3:]])
        assert nodes[0].store.snapshot() != nodes[4].store.snapshot()
        net.heal()
        with trio.fail_after(300):
            await wait_converged([n.store for n in nodes])
        for node in nodes:
            doc = node.store.doc("cfg")
            assert {k: doc.get(k) for k in acked} == acked
            assert node.store.counter("steps").value() == 15
