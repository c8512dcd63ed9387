"""Custom collectives over the in-memory fabric: send/recv, broadcast,
all_gather with ragged shapes, reduce_scatter, a ring written by hand, and
PeerLost semantics when a member dies."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import ReduceOp
from collectives.p2p import PointToPoint, Scattered, chunk_bounds
from collectives.run import Engine
from peerd.errors import ConfigError, Evicted, PeerLost

from .conftest import ids, run_while_p00_is_stranded, swarm


def p2p(e: Engine) -> PointToPoint:
    return PointToPoint.of(e)


async def test_send_recv_keeps_dtype_shape_and_order(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(2) as s:
        a = np.arange(12, dtype=np.int64).reshape(3, 4)
        b = np.linspace(0, 1, 5, dtype=np.float16)
        empty = np.zeros((0, 3), dtype=np.float32)

        async def fn(p: str, e: Engine) -> list[np.ndarray] | None:
            if p == "p00":
                for x in (a, b, empty):
                    await p2p(e).send("p01", x, tag="t")
                return None
            return [await p2p(e).recv("p00", tag="t") for _ in range(3)]

        got: list[np.ndarray] = (await s.each(fn))["p01"]
        sent: tuple[np.ndarray, ...] = (a, b, empty)
        for x, y in zip(sent, got, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        assert got[0].flags.writeable


async def test_ring_all_reduce_written_by_hand(mock_clock: trio.testing.MockClock) -> None:
    """Reduce-scatter then all-gather around the ring, from send/recv alone."""
    async with swarm(4) as s:
        rng = np.random.default_rng(1)
        values = {p: rng.integers(-50, 50, 22).astype(np.float32) for p in ids(4)}

        async def exchange(e: Engine, right: str, left: str, out: np.ndarray) -> np.ndarray:
            async with trio.open_nursery() as n:
                n.start_soon(p2p(e).send, right, out)
                got = await p2p(e).recv(left)
            return got

        async def ring(p: str, e: Engine) -> np.ndarray:
            v = e.view()
            n, r = v.size, v.rank
            right, left = v.members[(r + 1) % n], v.members[(r - 1) % n]
            x = values[p].copy()
            chunks = np.array_split(x, n)  # views into x
            for step in range(n - 1):
                got = await exchange(e, right, left, chunks[(r - step) % n])
                chunks[(r - step - 1) % n] += got
            for step in range(n - 1):
                got = await exchange(e, right, left, chunks[(r + 1 - step) % n])
                chunks[(r - step) % n][:] = got
            return x

        got = await s.each(ring)
        ref = np.sum([values[p] for p in ids(4)], axis=0)
        for p in ids(4):
            assert np.array_equal(got[p], ref), p


async def test_all_gather_ragged_shapes(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        mine = {p: np.arange(i + 1, dtype=np.int32) * 10 for i, p in enumerate(ids(3))}
        res = await s.each(lambda p, e: p2p(e).all_gather(mine[p], tag="idx"))
        for arrays, peers in res.values():
            assert peers == tuple(ids(3))
            for p, a in zip(peers, arrays, strict=True):
                assert np.array_equal(a, mine[p])


async def test_broadcast_in_place(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(4) as s:
        arrays = {p: np.full(1000, i, np.float32) for i, p in enumerate(ids(4))}
        res = await s.each(lambda p, e: p2p(e).broadcast(arrays[p], "p02"))
        assert set(res.values()) == {tuple(ids(4))}
        for a in arrays.values():
            assert np.all(a == 2.0)


async def test_reduce_scatter_chunks_sum_to_the_reference(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        rng = np.random.default_rng(0)
        inputs = {p: rng.standard_normal(10).astype(np.float32) for p in ids(3)}
        res = await s.each(lambda p, e: p2p(e).reduce_scatter(inputs[p], ReduceOp.SUM))
        bounds = chunk_bounds(10, 3)
        ref = np.asarray(np.sum([inputs[p] for p in ids(3)], axis=0, dtype=np.float32))
        for rank, p in enumerate(ids(3)):
            r: Scattered = res[p]
            assert (r.lo, r.hi) == bounds[rank] and r.participants == tuple(ids(3))
            assert np.allclose(r.chunk, ref[r.lo:r.hi], atol=1e-6)
        avg = await s.each(lambda p, e: p2p(e).reduce_scatter(inputs[p], "avg"))
        assert np.allclose(avg["p00"].chunk, ref[:4] / 3, atol=1e-6)


async def test_recv_from_a_killed_peer_raises_peer_lost(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        async def fn(p: str, e: Engine) -> object:
            if p == "p01":
                return await p2p(e).recv("p02", tag="x")
            if p == "p00":
                await trio.sleep(1.0)
                s.kill("p02")
            return None

        res = await s.each(fn, ["p00", "p01"])
        assert isinstance(res["p01"], PeerLost) and res["p01"].peers == ("p02",)
        with pytest.raises(PeerLost):
            await p2p(s.engines["p00"]).send("p02", np.zeros(1))
        with pytest.raises(ConfigError):
            await p2p(s.engines["p00"]).send("nobody", np.zeros(1))


async def test_all_gather_retries_over_survivors_and_broadcast_fails_everywhere(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(4) as s:
        killed = trio.Event()

        def on_send(src: str, dst: str, key: bytes) -> None:
            if src == "p03" and key.startswith(b"ag/") and not killed.is_set():
                killed.set()
                s.kill("p03")

        s.net.on_send = on_send
        mine = {p: np.full(2, i, np.float64) for i, p in enumerate(ids(4))}
        res = await s.each(lambda p, e: p2p(e).all_gather(mine[p]))
        assert killed.is_set()
        for arrays, peers in res.values():
            assert peers == ("p00", "p01", "p02")
            assert [float(a[0]) for a in arrays] == [0.0, 1.0, 2.0]

        # a broadcast whose root dies fails on every survivor, arrays untouched
        arrays = {p: np.zeros(8, np.float32) for p in s.alive()}
        arrays["p00"][:] = 7.0

        def kill_root(src: str, dst: str, key: bytes) -> None:
            if src == "p00" and key.startswith(b"bc/") and dst == "p02":
                s.net.on_send = None  # once: sends already under way still call this
                s.kill("p00")

        s.net.on_send = kill_root
        res = await s.each(lambda p, e: p2p(e).broadcast(arrays[p], "p00"))
        assert set(res) == {"p01", "p02"}
        for p, r in res.items():
            assert isinstance(r, PeerLost) and "p00" in r.peers, r
            assert not np.any(arrays[p])


async def test_a_member_that_knew_of_a_loss_before_it_came_holds_nobody_up(
    mock_clock: trio.testing.MockClock,
) -> None:
    """p02 is killed; p00 knows before its all_gather starts (it sends nothing
    then), p01 learns during it. p01 must not wait for p00's data until the
    deadline: the retry over the two goes on at once (it took 30 s, and ended
    in no quorum, with SparseLoCo's survivors of a kill on real daemons)."""
    async with swarm(3) as s:
        s.kill("p02")
        s.engines["p00"].lost({"p02"}, "test: p00 noticed first")
        assert "p02" not in s.engines["p01"].core.suspects
        start = trio.current_time()
        mine = {p: np.full(2, i, np.float64) for i, p in enumerate(ids(2))}
        res = await s.each(lambda p, e: p2p(e).all_gather(mine[p]))
        assert trio.current_time() - start < s.config.phase_timeout / 2
        for p, r in res.items():
            arrays, peers = r
            assert peers == ("p00", "p01"), (p, r)
            assert [float(a[0]) for a in arrays] == [0.0, 1.0]


async def test_a_member_that_gathered_a_round_the_others_did_not_is_left_out(
    mock_clock: trio.testing.MockClock,
) -> None:
    """After a split (p02 completed an all_gather that the others then retried
    without it), p02's next call must not be gathered as theirs: every member
    sees p02's differing history before using its array, the others go on
    without it, and p02 is evicted until it rejoins."""
    async with swarm(4) as s:
        await s.each(lambda p, e: p2p(e).all_gather(np.zeros(2, np.float32), tag="idx"))
        lone = p2p(s.engines["p02"])
        lone._history.record(("g", "idx"), s.engines["p02"].view().revision, 99)
        mine = {p: np.full(3, i, np.float32) for i, p in enumerate(ids(4))}
        res = await s.each(lambda p, e: p2p(e).all_gather(mine[p], tag="idx"))
        assert isinstance(res["p02"], Evicted), res["p02"]
        rest = ["p00", "p01", "p03"]
        for p in rest:
            arrays, peers = res[p]
            assert peers == tuple(rest), res
            assert all(np.array_equal(a, mine[q]) for a, q in zip(arrays, peers, strict=True))


@pytest.mark.parametrize("trial", range(8))
async def test_a_peer_stranded_mid_exchange_raises_evicted_at_once(
        mock_clock: trio.testing.MockClock, trial: int) -> None:
    """The point-to-point side of tests/collectives/test_rejoin.py's stranding
    test: with the link p00-p03 cut during a view change, p00 is left out of
    the others' revision 1. Its all_gather waits in
    ``recv_from`` for members that went on; once their heartbeat answers
    strand it, the wait ends with ``Evicted``, not at the deadline."""
    members, out = await run_while_p00_is_stranded(
        lambda p, e: p2p(e).all_gather(np.full(3, int(p[1:]), np.int32)))
    for p, r in out.items():
        if p != "p00":
            arrays, got_members = r
            assert got_members == members
            assert [int(a[0]) for a in arrays] == [int(m[1:]) for m in members]
