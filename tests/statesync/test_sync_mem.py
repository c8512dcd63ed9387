"""Shared-state sync over the in-memory fabric: convergence, strategies,
joining, striping over holders, failover and corrupted sources."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import SyncResult, SyncStrategy
from collectives.run import Engine
from collectives.statesync import StateSync
from peerd.errors import ConfigError, PeerLost

from .conftest import CorruptingFabric, Swarm, digest_of, ids, make_state, swarm

SIZES = {"a": 1000, "b": 3000, "c": 50, "d": 700_000}  # d spans 3 pieces


async def test_diverged_peers_converge_to_the_popular_state(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(4) as s:
        base = make_state(1, SIZES)
        states = {p: {k: v.copy() for k, v in base.items()} for p in s.alive()}
        # p01 and p02 drift in different tensors; p00 and p03 hold the popular state.
        states["p01"]["b"][7] += 1.0
        states["p02"]["d"][-1] = 42.0
        states["p02"]["c"][:] = 0.0

        results = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 5))
        for p, st in states.items():
            for k in SIZES:
                assert np.array_equal(st[k].view(np.uint32), base[k].view(np.uint32)), (p, k)
        r: dict[str, SyncResult] = results
        assert r["p01"].tensors_received == ("b",)
        assert r["p02"].tensors_received == ("c", "d")
        assert r["p00"].tensors_received == () and r["p03"].tensors_received == ()
        assert r["p01"].bytes_received == base["b"].nbytes
        assert {x.participants for x in r.values()} == {tuple(ids(4))}
        assert len({x.revision for x in r.values()}) == 1
        # holders served exactly what was fetched
        served = sum(x.bytes_sent for x in r.values())
        assert served == sum(x.bytes_received for x in r.values())


async def test_most_votes_win_over_higher_revision(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        old, new = make_state(1, {"w": 64}), make_state(2, {"w": 64})
        states = {"p00": {"w": old["w"].copy()}, "p01": {"w": old["w"].copy()},
                  "p02": {"w": new["w"].copy()}}
        revs = {"p00": 3, "p01": 3, "p02": 9}
        await s.each(lambda p, e: StateSync.of(e).sync(states[p], revs[p]))
        for p in s.alive():
            assert np.array_equal(states[p]["w"], old["w"])


async def test_tie_goes_to_higher_revision(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(2) as s:
        a, b = make_state(1, {"w": 10}), make_state(2, {"w": 10})
        states = {"p00": a, "p01": b}
        revs = {"p00": 1, "p01": 2}
        await s.each(lambda p, e: StateSync.of(e).sync(states[p], revs[p]))
        assert np.array_equal(states["p00"]["w"], make_state(2, {"w": 10})["w"])


async def test_send_only_keeps_its_state_and_receive_only_does_not_vote(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        x, y = make_state(1, {"w": 100}), make_state(2, {"w": 100})
        states = {"p00": {"w": x["w"].copy()}, "p01": {"w": y["w"].copy()},
                  "p02": {"w": y["w"].copy()}}
        strategies = {"p00": SyncStrategy.SEND_ONLY, "p01": SyncStrategy.RECEIVE_ONLY,
                      "p02": SyncStrategy.RECEIVE_ONLY}
        res = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1, strategies[p]))
        # only p00 votes, so its state wins and the receive-only peers take it
        for p in s.alive():
            assert np.array_equal(states[p]["w"], x["w"]), p
        assert res["p00"].bytes_sent == 2 * x["w"].nbytes

        # p00 sends only; the two others out-vote it and p00 keeps its own state
        states["p00"]["w"][:] = 5.0
        strategies = {"p00": SyncStrategy.SEND_ONLY, "p01": SyncStrategy.ENFORCE_POPULAR,
                      "p02": SyncStrategy.ENFORCE_POPULAR}
        res = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 2, strategies[p]))
        assert np.all(states["p00"]["w"] == 5.0)
        assert np.array_equal(states["p01"]["w"], x["w"])
        assert res["p00"].tensors_received == ()
        assert res["p00"].bytes_sent == 0


async def join_and_sync(s: Swarm, joiner: str, states: dict[str, dict[str, np.ndarray]],
                        revision: int) -> dict[str, SyncResult]:
    """The joiner asks to join; once its request is pending, every member
    reaches the round boundary (sync_state)."""
    out: dict[str, SyncResult] = {}
    members = s.alive()
    engine = await s.start(joiner, None)

    async def run(p: str, e: Engine, strategy: SyncStrategy) -> None:
        with trio.CancelScope() as scope:
            s.task_scopes.setdefault(p, []).append(scope)  # a kill cancels it
            out[p] = await StateSync.of(e).sync(states[p], revision, strategy)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, joiner, engine, SyncStrategy.RECEIVE_ONLY)
        while not any(engine.me in s.engines[p].core.joiners(trio.current_time())
                      for p in members):
            await trio.sleep(0.1)
        for p in members:
            nursery.start_soon(run, p, s.engines[p], SyncStrategy.ENFORCE_POPULAR)
    return {p: r for p, r in out.items() if p in s.engines}


async def test_joiner_receives_state_striped_over_three_holders(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        base = make_state(3, {"big": 2_500_000, "small": 10})  # 10 MB: 10 pieces
        states = {p: {k: v.copy() for k, v in base.items()} for p in s.alive()}
        await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1))
        states["p09"] = {k: np.zeros_like(v) for k, v in base.items()}
        before = dict(s.net.bytes_sent)
        out = await join_and_sync(s, "p09", states, 2)
        members = tuple(sorted([*ids(3), "p09"]))
        assert s.engines["p09"].view().members == members
        for k in base:
            assert np.array_equal(states["p09"][k], base[k])
        assert set(out["p09"].tensors_received) == {"big", "small"}
        assert {r.participants for r in out.values()} == {members}
        # every holder served a share: striped, not all from one
        total = base["big"].nbytes + base["small"].nbytes
        assert out["p09"].bytes_received == total
        assert sum(out[p].bytes_sent for p in ids(3)) == total
        for p in ids(3):
            assert out[p].bytes_sent >= total // 4, out
            wire = s.net.bytes_sent.get((p, "p09"), 0) - before.get((p, "p09"), 0)
            assert wire >= out[p].bytes_sent


async def test_holder_killed_mid_transfer_joiner_fetches_the_rest(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        base = make_state(4, {"big": 3_000_000})  # 12 MB: 12 pieces, 4 per holder
        states = {p: {k: v.copy() for k, v in base.items()} for p in s.alive()}
        await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1))
        states["p09"] = {k: np.zeros_like(v) for k, v in base.items()}
        sent: dict[str, int] = {}

        def on_send(src: str, dst: str, key: bytes) -> None:
            if dst == "p09" and key[-1:].isdigit():  # a state piece
                sent[src] = sent.get(src, 0) + 1
                if src == "p01" and sent[src] == 2:
                    s.kill("p01")

        s.net.on_send = on_send
        out = await join_and_sync(s, "p09", states, 2)
        assert "p01" not in out
        assert np.array_equal(states["p09"]["big"], base["big"])
        assert out["p09"].bytes_received == base["big"].nbytes
        assert StateSync.of(s.engines["p09"]).statistics().sources_dropped == 1
        # the survivors served the pieces the dead holder did not
        assert out["p00"].bytes_sent + out["p02"].bytes_sent > base["big"].nbytes * 2 // 3
        # the next boundary drops the dead holder
        res = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 3))
        assert {r.participants for r in res.values()} == {("p00", "p02", "p09")}


async def test_corrupt_holder_is_detected_and_dropped(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3, wrap={"p01": CorruptingFabric}) as s:
        base = make_state(5, {"w": 600_000, "v": 20})
        states = {p: {k: v.copy() for k, v in base.items()} for p in ("p00", "p01")}
        states["p02"] = {k: np.zeros_like(v) for k, v in base.items()}
        res = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1))
        assert np.array_equal(states["p02"]["w"], base["w"])
        assert np.array_equal(states["p02"]["v"], base["v"])
        assert s.fabrics["p01"].corrupted >= 1
        stats = StateSync.of(s.engines["p02"]).statistics()
        assert stats.corrupt_pieces >= 1 and stats.sources_dropped == 1
        assert res["p02"].bytes_received == base["w"].nbytes + base["v"].nbytes
        assert digest_of(states["p02"]) == digest_of(base)


async def test_only_holder_corrupt_raises_and_installs_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(2, wrap={"p00": CorruptingFabric}) as s:
        good = make_state(6, {"w": 1000})
        states = {"p00": {"w": good["w"].copy()}, "p01": {"w": np.zeros(1000, np.float32)}}
        strategies = {"p00": SyncStrategy.ENFORCE_POPULAR, "p01": SyncStrategy.RECEIVE_ONLY}
        res = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1, strategies[p]))
        assert isinstance(res["p01"], PeerLost) and res["p01"].peers == ("p00",)
        assert not np.any(states["p01"]["w"])  # no unverified byte was installed
        assert isinstance(res["p00"], SyncResult)  # the holder is not stalled for ever


async def test_incompatible_state_is_a_config_error(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        states = {p: make_state(1, {"w": 10}) for p in ("p00", "p01")}
        states["p02"] = {"w": np.zeros(11, np.float32)}
        res = await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1))
        assert isinstance(res["p02"], ConfigError)
        assert isinstance(res["p00"], SyncResult) and isinstance(res["p01"], SyncResult)


async def test_torch_and_mixed_dtypes_sync_in_place(mock_clock: trio.testing.MockClock) -> None:
    torch = pytest.importorskip("torch")
    async with swarm(2) as s:
        gen = torch.Generator().manual_seed(0)
        src = {"w": torch.randn(300, generator=gen).to(torch.bfloat16),
               "step": torch.tensor(17, dtype=torch.int64),
               "mask": torch.rand(33, generator=gen) > 0.5}
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        ptrs = {k: v.data_ptr() for k, v in dst.items()}
        states = {"p00": src, "p01": dst}
        strategies = {"p00": SyncStrategy.SEND_ONLY, "p01": SyncStrategy.RECEIVE_ONLY}
        await s.each(lambda p, e: StateSync.of(e).sync(states[p], 1, strategies[p]))
        for k in src:
            assert torch.equal(dst[k], src[k]) and dst[k].data_ptr() == ptrs[k]
