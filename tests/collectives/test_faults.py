"""Faults at named phases: every survivor ends in the same state (torchft style)."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import AllReduceResult
from peerd.errors import PeerLost
from tests.collectives.conftest import FAST, Swarm, inputs, reference, same_bytes, swarm

HB = FAST.timing


def kill_on_first(s: Swarm, victim: str, phase: bytes) -> None:
    """Kill ``victim`` the moment it starts sending its first ``phase`` block."""

    def tap(src: str, dst: str, key: bytes) -> None:
        if src == victim and key.startswith(b"ar/") and f"/{phase.decode()}/".encode() in key:
            s.net.on_send = None
            s.kill(victim)

    s.net.on_send = tap


async def run_round(s: Swarm, n: int, retry: bool, seed: int = 5):  # type: ignore[no-untyped-def]
    data = inputs(s.alive(), n, seed=seed)
    arrays = {p: v.copy() for p, v in data.items()}
    out = await s.each(lambda p, e: e.all_reduce(arrays[p], "avg", retry=retry))
    return data, arrays, out


def assert_all_lost(out, data, arrays, victim: str) -> None:  # type: ignore[no-untyped-def]
    assert victim not in out and out
    for p, r in out.items():
        assert isinstance(r, PeerLost), (p, r)
        assert victim in r.peers
        assert np.array_equal(arrays[p], data[p])  # input left intact


def assert_survivor_average(s: Swarm, out, data, arrays, victim: str) -> None:  # type: ignore[no-untyped-def]
    survivors = s.alive()
    assert victim not in survivors and sorted(out) == survivors
    want = reference(data, survivors, True)
    for r in out.values():
        assert isinstance(r, AllReduceResult)
        assert sorted(r.participants) == survivors and r.attempts == 2 and r.revision == 1, (r, out)
    for p in survivors:
        np.testing.assert_allclose(arrays[p], want, rtol=1e-5, atol=1e-6)
    assert same_bytes([arrays[p] for p in survivors])


@pytest.mark.parametrize("phase", [b"r", b"g"])
@pytest.mark.parametrize("victim", ["p00", "p02"])  # p00 is the coordinator
async def test_kill_mid_round_without_retry(
    mock_clock: trio.testing.MockClock, phase: bytes, victim: str
) -> None:
    async with swarm(4) as s:
        kill_on_first(s, victim, phase)
        data, arrays, out = await run_round(s, 301, retry=False)
        assert_all_lost(out, data, arrays, victim)


@pytest.mark.parametrize("phase", [b"r", b"g"])
@pytest.mark.parametrize(("size", "victim"), [(3, "p01"), (4, "p00"), (8, "p05")])
async def test_kill_mid_round_with_retry(
    mock_clock: trio.testing.MockClock, phase: bytes, size: int, victim: str
) -> None:
    async with swarm(size) as s:
        kill_on_first(s, victim, phase)
        data, arrays, out = await run_round(s, 211, retry=True)
        assert_survivor_average(s, out, data, arrays, victim)
        for p in s.alive():
            assert s.engines[p].view().members == out[p].participants


async def test_kill_between_rounds(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(4) as s:
        await run_round(s, 50, retry=False)
        s.kill("p03")
        data, arrays, out = await run_round(s, 50, retry=False)
        assert_all_lost(out, data, arrays, "p03")
        # the survivors already know; with retry they reform and succeed
        data, arrays, out = await run_round(s, 50, retry=True)
        assert_survivor_average(s, out, data, arrays, "p03")


async def test_stalled_peer_is_detected_within_the_heartbeat_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(4) as s:
        await trio.sleep(3 * HB.heartbeat_interval)  # steady state: heartbeats flowing
        s.net.stall("p02")
        start = trio.current_time()
        survivors = ["p00", "p01", "p03"]
        data = inputs(survivors, 64)
        arrays = {p: v.copy() for p, v in data.items()}
        out = await s.each(lambda p, e: e.all_reduce(arrays[p], retry=False), survivors)
        elapsed = trio.current_time() - start
        assert elapsed <= HB.heartbeat_timeout + 2 * HB.heartbeat_interval
        assert elapsed < FAST.phase_timeout  # found by heartbeats, not by a deadline
        for p, r in out.items():
            assert isinstance(r, PeerLost) and r.peers == ("p02",)
            assert np.array_equal(arrays[p], data[p])
        out = await s.each(lambda p, e: e.all_reduce(arrays[p]), survivors)
        want = reference(data, survivors, True)
        for p, r in out.items():
            assert isinstance(r, AllReduceResult) and sorted(r.participants) == survivors
            np.testing.assert_allclose(arrays[p], want, rtol=1e-5)
        assert same_bytes(list(arrays.values()))


async def test_cut_link_leaves_consistent_outcomes(mock_clock: trio.testing.MockClock) -> None:
    """Partial connectivity: which side is dropped depends on timing, but every
    peer that succeeds holds the same bytes, averaged over exactly its
    participants, and never over both ends of the cut link."""
    async with swarm(4) as s:
        s.net.cut("p01", "p02")  # neighbours on the ring
        data, arrays, out = await run_round(s, 40, retry=True)
        ok = {p: r for p, r in out.items() if isinstance(r, AllReduceResult)}
        assert len(ok) >= 2
        (participants,) = {r.participants for r in ok.values()}
        assert sorted(ok) == sorted(participants)
        assert not {"p01", "p02"} <= set(participants)
        want = reference(data, list(participants), True)
        for p in ok:
            np.testing.assert_allclose(arrays[p], want, rtol=1e-5)
        assert same_bytes([arrays[p] for p in ok])
        for p, r in out.items():
            if p not in ok:
                assert isinstance(r, PeerLost), repr(r)
                assert np.array_equal(arrays[p], data[p])


async def test_a_broken_data_link_confirms_a_kill_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The transport reports a data connection that ended without a close: a
    dead peer is then lost after one unanswered heartbeat (two intervals), not
    after the heartbeat timeout; a live peer answers and stays."""
    async with swarm(4) as s:
        await trio.sleep(3 * HB.heartbeat_interval)
        s.engines["p00"].link_broken("p01")  # p01 is alive: nothing happens
        # A killed process's control connection just goes silent (QUIC over UDP
        # sees no reset), which the memory network's stall models.
        s.net.stall("p03")
        start = trio.current_time()
        for p in ("p00", "p01", "p02"):
            s.engines[p].link_broken("p03")
        while "p03" not in s.engines["p00"].core.suspects:
            await s.engines["p00"].changed().wait()
        assert trio.current_time() - start <= 2 * HB.heartbeat_interval + 1e-9
        assert "p01" not in s.engines["p00"].core.suspects
        survivors = ["p00", "p01", "p02"]
        out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32)), survivors)
        for r in out.values():
            assert isinstance(r, AllReduceResult) and r.participants == tuple(survivors), r
