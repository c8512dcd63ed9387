"""Partitions: a swarm split in two, then healed (in-process, memory network, mock clock)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import AllReduceResult, SyncResult
from collectives.statesync import StateSync
from peerd.errors import PeerLost
from tests.collectives.conftest import inputs, reference, same_bytes, swarm
from tests.crdt.cluster import open_cluster, wait_converged

BIG, SMALL = ["p00", "p01", "p02"], ["p03", "p04"]


def _split(s, a: list[str], b: list[str], heal: bool = False) -> None:  # type: ignore[no-untyped-def]
    for x in a:
        for y in b:
            (s.net.heal if heal else s.net.cut)(x, y)


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


async def _stranded(s, peers: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Wait until each of ``peers`` has learned that the other side went on."""
    with trio.fail_after(60):
        for p in peers:
            engine = s.engines[p]
            while not engine.core.stranded:
                await engine.changed().wait()


async def _rejoin(s, boundary, max_boundaries: int = 5):  # type: ignore[no-untyped-def]
    """The minority waits at its round boundary (``boundary(peer, engine)``)
    while the majority passes boundaries until the whole minority is admitted;
    a minority peer admitted earlier passes the later boundaries with the
    majority, as its training loop would (a member that skips a boundary is
    dropped from the view). Returns every peer's last result, and the result
    with which each minority peer was admitted."""
    out: dict[str, object] = {}
    joined: dict[str, object] = {}
    admitted: list[str] = []

    async def minority(p: str) -> None:
        joined.update(await s.each(boundary, [p]))
        out[p] = joined[p]
        admitted.append(p)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for p in SMALL:
                nursery.start_soon(minority, p)
            for _ in range(max_boundaries):
                out.update(await s.each(boundary, BIG + admitted))
                if all(s.engines[p].current_view() is not None for p in SMALL):
                    break
    return out, joined


async def test_views_reconverge_after_heal(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(5) as s:
        _split(s, BIG, SMALL)
        _, _, out = await _round(s, 3)
        assert all(isinstance(out[p], PeerLost) for p in SMALL), out
        assert s.engines["p00"].view().members == tuple(
            m for m in s.engines["p00"].view().members if m in BIG)
        _split(s, BIG, SMALL, heal=True)
        await _stranded(s, SMALL)
        # Stranded: no view of its own, collectives fail cleanly.
        assert s.engines["p03"].current_view() is None
        with pytest.raises(PeerLost, match="went on without this peer"):
            await s.engines["p03"].all_reduce(np.ones(8, np.float32))
        views, _ = await _rejoin(s, lambda p, e: e.update_view())
        whole = {p: v for p, v in views.items() if len(v.members) == 5}
        assert set(whole) >= set(SMALL), views
        assert len({(v.revision, v.members) for v in whole.values()}) == 1, whole
        data, arrays, out = await _round(s, 4)
        assert all(isinstance(r, AllReduceResult) and len(r.participants) == 5
                   for r in out.values()), out
        np.testing.assert_allclose(arrays["p03"], reference(data, BIG + SMALL, True),
                                   rtol=1e-5, atol=1e-6)
        assert same_bytes(list(arrays.values()))


def _digest(state: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(state[k].tobytes() for k in sorted(state))).hexdigest()


async def test_shared_state_of_healed_minority_converges(
        mock_clock: trio.testing.MockClock) -> None:
    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal(5000).astype(np.float32), "step": np.zeros(1, np.float32)}
    states = {p: {k: v.copy() for k, v in base.items()} for p in BIG + SMALL}
    async with swarm(5) as s:
        _split(s, BIG, SMALL)
        # Apart: the majority trains on (all-reduced updates), the minority
        # cannot all-reduce and drifts on local steps of its own.
        for rnd in range(3):
            data, arrays, out = await _round(s, 10 + rnd)
            for p in BIG:
                assert sorted(out[p].participants) == BIG, out
                states[p]["w"][: arrays[p].size] += arrays[p]
                states[p]["step"] += 1
            for i, p in enumerate(SMALL):
                assert isinstance(out[p], PeerLost), out
                states[p]["w"] *= 1.0 + 0.01 * (i + 1)
        assert len({_digest(states[p]) for p in BIG}) == 1
        assert not {_digest(states[p]) for p in SMALL} & {_digest(states["p00"])}
        majority = _digest(states["p00"])
        _split(s, BIG, SMALL, heal=True)
        await _stranded(s, SMALL)
        results, joined = await _rejoin(s, lambda p, e: StateSync.of(e).sync(states[p], 3))
        for p in SMALL:
            assert isinstance(results[p], SyncResult), results
            assert sorted(results[p].participants) == BIG + SMALL, results
            first = joined[p]
            assert isinstance(first, SyncResult) and first.bytes_received > 0, joined
        assert {_digest(states[p]) for p in BIG + SMALL} == {majority}
        # And the healed swarm trains on together.
        data, arrays, out = await _round(s, 20)
        assert all(isinstance(r, AllReduceResult) and len(r.participants) == 5
                   for r in out.values()), out
        np.testing.assert_allclose(arrays["p04"], reference(data, BIG + SMALL, True),
                                   rtol=1e-5, atol=1e-6)


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
