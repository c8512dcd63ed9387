"""Faults at named phases: every survivor ends in the same state (torchft style)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import AllReduceResult
from collectives.history import NO_HISTORY, diverged, odd_histories
from collectives.history import mark as last_commit_mark
from collectives.memfabric import MemFabric
from collectives.run import Engine
from peerd.errors import Evicted, PeerLost
from tests.collectives.conftest import (
    FAST,
    Swarm,
    WrappedFabric,
    inputs,
    reference,
    same_bytes,
    swarm,
    uneven_links,
)

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
        assert victim in r.peers, out
        assert np.array_equal(arrays[p], data[p])  # input left intact


def assert_survivor_average(s: Swarm, out, data, arrays, victim: str) -> None:  # type: ignore[no-untyped-def]
    survivors = s.alive()
    assert victim not in survivors and sorted(out) == survivors
    want = reference(data, survivors, True)
    for r in out.values():
        assert isinstance(r, AllReduceResult), out
        assert sorted(r.participants) == survivors and r.attempts == 2 and r.revision == 1, (r, out)
    for p in survivors:
        np.testing.assert_allclose(arrays[p], want, rtol=1e-5, atol=1e-6)
    assert same_bytes([arrays[p] for p in survivors])


def assert_one_outcome(out, data, arrays) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """Every peer that got a result got the same view's, which names exactly
    them and holds their average, bit-identical; the others raised with their
    input intact. Returns the participants."""
    ok = {p: r for p, r in out.items() if isinstance(r, AllReduceResult)}
    assert ok, out
    assert len({(r.revision, r.participants) for r in ok.values()}) == 1, out
    (participants,) = {r.participants for r in ok.values()}
    assert sorted(ok) == sorted(participants), out
    want = reference(data, list(participants), True)
    for p in ok:
        np.testing.assert_allclose(arrays[p], want, rtol=1e-5, atol=1e-6)
    assert same_bytes([arrays[p] for p in ok])
    for p, r in out.items():
        if p not in ok:
            assert isinstance(r, PeerLost), repr(r)
            assert np.array_equal(arrays[p], data[p])
    return tuple(participants)


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
        participants = assert_one_outcome(out, data, arrays)
        assert len(participants) >= 2
        assert not {"p01", "p02"} <= set(participants)


@pytest.mark.parametrize("trial", range(6))
async def test_two_crossing_cut_links_leave_a_pair_going_on(
        mock_clock: trio.testing.MockClock, trial: int) -> None:
    """The links p00-p02 and p01-p03 are cut during a round. Each peer still
    reaches two of the three others, but no three reach each other. p00 with
    either neighbour is half the view with its lowest id, a quorum: that pair
    must go on, and the other two be evicted. Each peer used to take up the
    losses the others reported until none held a quorum: then no view formed
    while the cuts lasted, and every peer got ``PeerLost`` (4 of these 6
    trials, the last after 32-52 s)."""
    async with swarm(4) as s:
        uneven_links(s, trial)

        async def cut() -> None:
            await trio.sleep(0.05)
            s.net.cut("p00", "p02")
            await trio.sleep(0.001 * trial)
            s.net.cut("p01", "p03")

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut)
            data, arrays, out = await run_round(s, 4096, retry=True)
        # The cuts may land after the round's data has passed: all four in it.
        first = assert_one_outcome(out, data, arrays)
        assert len(first) in (2, 4), out
        data, arrays, out = await run_round(s, 40, retry=True)
        pair = assert_one_outcome(out, data, arrays)
        assert pair in (("p00", "p01"), ("p00", "p03")), out
        assert all(isinstance(r, Evicted) for p, r in out.items() if p not in pair), out
        assert trio.current_time() - start < FAST.phase_timeout / 3


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


class SuspectsAfterLastBlock(WrappedFabric):
    """p01's fabric: once p01 has received its last all-gather block (it has
    forwarded everything the others need, so their rings complete), its engine
    wrongly declares ``victim`` gone, as a missed heartbeat under load would."""

    def __init__(self, inner: MemFabric, s: list[Swarm], victim: str, blocks: int) -> None:
        super().__init__(inner)
        self._swarm, self._victim, self._left = s, victim, blocks

    async def recv_data_into(self, peer: str, key: bytes, out: memoryview) -> None:
        await self._inner.recv_data_into(peer, key, out)
        if key.startswith(b"ar/") and b"/g/" in key:
            self._left -= 1
            if self._left == 0:
                self._swarm[0].engines[self.me].lost({self._victim}, "test: false suspicion")


async def test_a_false_suspicion_at_the_end_of_the_ring_never_splits_the_results(
    mock_clock: trio.testing.MockClock,
) -> None:
    """p01 gives up on p03 after every ring completed except its own: p03 holds
    the whole result but must not commit it while p01 (and whoever p01 told)
    goes on without p03. Every peer that returns a result returns the same
    view's result, bit-identical; the others raise with their input intact."""
    holder: list[Swarm] = []
    n = 4 * 16  # one sub-chunk per ring chunk: three all-gather blocks per peer
    wrap = {"p01": lambda f: SuspectsAfterLastBlock(f, holder, "p03", blocks=3)}
    async with swarm(4, wrap=wrap) as s:
        holder.append(s)
        data, arrays, out = await run_round(s, n, retry=True)
        participants = assert_one_outcome(out, data, arrays)
        assert "p03" not in participants, out  # p01 and those it told went on without it


def test_the_majority_history_stands_and_peers_without_one_are_never_blamed() -> None:
    a, b = last_commit_mark(5, 0), last_commit_mark(4, 2)
    assert odd_histories({"p0": a, "p1": a, "p2": b, "p3": NO_HISTORY}) == {"p2"}
    assert odd_histories({"p0": b, "p1": b, "p2": a}) == {"p2"}
    assert odd_histories({"p0": a, "p1": b}) == odd_histories({"p1": b, "p0": a}) == {"p1"}
    assert odd_histories({"p0": NO_HISTORY, "p1": a}) == set()


def test_last_commits_diverge_only_between_peers_that_both_have_one() -> None:
    assert not diverged(last_commit_mark(3, 0), last_commit_mark(3, 0))
    assert diverged(last_commit_mark(3, 1), last_commit_mark(3, 0))
    assert diverged(last_commit_mark(4, 0), last_commit_mark(3, 0))
    assert not diverged(NO_HISTORY, last_commit_mark(3, 0))  # a joiner has nothing to compare
    assert not diverged(last_commit_mark(3, 0), NO_HISTORY)


async def test_a_peer_that_committed_a_round_the_others_did_not_is_left_out(
    mock_clock: trio.testing.MockClock,
) -> None:
    """After a split (p02 committed a result the others then retried without
    it), p02's next call must not meet the others' calls under the same keys:
    its data is another round's. Its neighbours see the differing last commit
    before using any of its data; the rest go on without it, and p02's input
    is in nobody's result."""
    async with swarm(4) as s:
        await run_round(s, 64, retry=True)  # a first commit everyone shares
        engine = s.engines["p02"]
        engine._history.record("default", engine.core.view.revision, 99)  # type: ignore[union-attr]
        data, arrays, out = await run_round(s, 64, retry=True, seed=9)
        ok = {p: r for p, r in out.items() if isinstance(r, AllReduceResult)}
        assert sorted(ok) == ["p00", "p01", "p03"], out
        assert {r.participants for r in ok.values()} == {("p00", "p01", "p03")}
        want = reference(data, ["p00", "p01", "p03"], True)
        for p in ok:
            np.testing.assert_allclose(arrays[p], want, rtol=1e-5)
        assert same_bytes([arrays[p] for p in ok])
        assert isinstance(out["p02"], Evicted), out["p02"]
        assert np.array_equal(arrays["p02"], data["p02"])
        # Readmitted at the next round boundary with a fresh history, it takes part again.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.engines["p02"].join)
            await trio.sleep(2 * HB.heartbeat_interval)  # its join requests are pending
            await s.each(lambda p, e: e.update_view(), ["p00", "p01", "p03"])
        data, arrays, out = await run_round(s, 64, retry=True, seed=10)
        assert {r.participants for r in out.values()} == {("p00", "p01", "p02", "p03")}, out
        assert same_bytes(list(arrays.values()))


class DropsOneCallSession(WrappedFabric):
    """A fabric whose first call of ``method`` (a heartbeat unless told) to
    ``peer`` fails with ``PeerLost``, as a call does on a session closed under
    it as a duplicate of another."""

    def __init__(self, inner: MemFabric, peer: str, method: str = "hb") -> None:
        super().__init__(inner)
        self._peer, self._method, self.dropped = peer, method, 0

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes:
        if peer == self._peer and method.endswith("/" + self._method) and not self.dropped:
            self.dropped += 1
            raise PeerLost([peer], "duplicate session")
        return await self._inner.call(peer, method, payload, timeout)


async def test_a_heartbeat_cut_off_by_a_replaced_session_loses_no_peer(
    mock_clock: trio.testing.MockClock,
) -> None:
    """One heartbeat failing with ``PeerLost`` while the peer is still there
    (its session was replaced) must not make the peer a suspect: it cost a
    4-peer benchmark one member, evicted mid-run."""
    fabrics: list[DropsOneCallSession] = []

    def wrap(f: MemFabric) -> DropsOneCallSession:
        fabrics.append(DropsOneCallSession(f, "p01"))
        return fabrics[-1]

    async with swarm(3, wrap={"p00": wrap}) as s:
        await trio.sleep(3 * FAST.timing.heartbeat_interval)
        assert fabrics[0].dropped == 1
        assert s.engines["p00"].core.suspects == set()
        data, arrays, out = await run_round(s, 3 * 16, retry=False)
        assert len(assert_one_outcome(out, data, arrays)) == 3


async def test_a_ready_cut_off_by_a_replaced_session_keeps_the_coordinator(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A member's ready to the coordinator failing with ``PeerLost`` while the
    coordinator is still there (the session under the call was replaced) must
    not make the coordinator a suspect, nor drop it from the view."""
    fabrics: list[DropsOneCallSession] = []

    def wrap(f: MemFabric) -> DropsOneCallSession:
        fabrics.append(DropsOneCallSession(f, "p00", method="ready"))
        return fabrics[-1]

    async with swarm(3, wrap={"p01": wrap}) as s:
        views = await s.each(lambda p, e: e.update_view())
        assert fabrics[0].dropped == 1  # p01 asked p00, the coordinator, and was cut off
        assert {v.members for v in views.values()} == {("p00", "p01", "p02")}, views
        assert len({v.revision for v in views.values()}) == 1
        assert all(not e.core.suspects for e in s.engines.values())
        data, arrays, out = await run_round(s, 3 * 16, retry=False)
        assert len(assert_one_outcome(out, data, arrays)) == 3


@pytest.mark.parametrize(("size", "absent"), [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0),
                                             (4, 1), (4, 2), (4, 3)])
async def test_a_member_that_never_starts_the_round_is_the_one_every_survivor_names(
    mock_clock: trio.testing.MockClock, size: int, absent: int
) -> None:
    """A member alive and heartbeating whose training process never calls the
    all-reduce (hung, or slower than the phase deadline) stalls the whole
    ring: every peer's left neighbour is late. The survivors must agree that
    the absent one is gone (not each blame its own left neighbour, which left
    them without a view they could agree on) and go on without it."""
    async with swarm(size) as s:
        victim = f"p{absent:02d}"
        survivors = [p for p in s.alive() if p != victim]
        data = inputs(survivors, 97)
        arrays = {p: v.copy() for p, v in data.items()}
        start = trio.current_time()
        out = await s.each(lambda p, e: e.all_reduce(arrays[p], retry=False), survivors)
        assert trio.current_time() - start >= FAST.phase_timeout  # a deadline found it
        for p, r in out.items():
            assert isinstance(r, PeerLost) and r.peers == (victim,), (p, r)
            assert "never started this all-reduce" in str(r)
            assert np.array_equal(arrays[p], data[p])
        if size == 2:
            return  # one of two is no majority: the survivor cannot go on alone
        out = await s.each(lambda p, e: e.all_reduce(arrays[p]), survivors)
        assert sorted(assert_one_outcome(out, data, arrays)) == survivors, out


@pytest.mark.parametrize(("size", "absent"), [(2, "p00"), (2, "p01"), (3, "p00"), (3, "p01"),
                                             (3, "p02")])
async def test_an_absent_member_is_found_at_the_phase_timeout_whatever_the_tensors_size(
    mock_clock: trio.testing.MockClock, size: int, absent: str
) -> None:
    """The data phases' deadlines add the tensor's size at the minimum
    bandwidth (here 1 byte/s: over 30 minutes; 350 s for 100M fp32 at the
    default 10 Mbit/s). A member that never starts is named when the phase
    timeout passes since the survivors started, not at those deadlines, by
    every survivor: the one it is the left neighbour of too (in a ring of
    two, the only other member), since a member's history reaches its right
    neighbour before its data."""
    config = dataclasses.replace(FAST, min_bandwidth=1.0)
    async with swarm(size, config) as s:
        survivors = [p for p in s.alive() if p != absent]
        data = inputs(survivors, 503)
        arrays = {p: v.copy() for p, v in data.items()}
        start = trio.current_time()
        out = await s.each(lambda p, e: e.all_reduce(arrays[p], retry=False), survivors)
        waited = trio.current_time() - start
        assert FAST.phase_timeout <= waited < FAST.phase_timeout + 10, waited
        for p, r in out.items():
            assert isinstance(r, PeerLost) and r.peers == (absent,), (p, r)
            assert "never started this all-reduce" in str(r)
            assert np.array_equal(arrays[p], data[p])


class HistoryNeverReaches(WrappedFabric):
    """A member's fabric whose history messages to ``peer`` never arrive (held
    up, as behind other data on a slow link): everything else goes through."""

    def __init__(self, inner: MemFabric, peer: str) -> None:
        super().__init__(inner)
        self._peer, self.held = peer, 0

    async def send_data(self, peer: str, key: bytes, data: Any) -> None:
        if peer == self._peer and key.startswith(b"ar/") and key.endswith(b"/h/0.0"):
            self.held += 1
            return
        await self._inner.send_data(peer, key, data)


async def test_a_ring_that_completed_never_waits_for_a_late_history(
    mock_clock: trio.testing.MockClock,
) -> None:
    """p02's history never reaches p00 (not its neighbour in the ring of 4):
    once p00's part of the ring is done, every member had started, and p00
    neither waits for the message nor names p02 at the phase timeout."""
    fabrics: list[HistoryNeverReaches] = []

    def wrap(f: MemFabric) -> HistoryNeverReaches:
        fabrics.append(HistoryNeverReaches(f, "p00"))
        return fabrics[-1]

    async with swarm(4, wrap={"p02": wrap}) as s:
        start = trio.current_time()
        data, arrays, out = await run_round(s, 4 * 16, retry=False)
        assert trio.current_time() - start < FAST.phase_timeout
        assert fabrics[0].held == 1
        assert sorted(assert_one_outcome(out, data, arrays)) == s.alive(), out


class HistoryBehindOtherData(WrappedFabric):
    """A member whose history to ``peer`` is held up for ``hold`` seconds
    behind another transfer (a ``filler``-byte message each second, under a
    key of no collective: another tag's stripes on a slow link), or behind
    nothing when ``filler`` is 0."""

    def __init__(self, inner: MemFabric, peer: str, hold: float, filler: int) -> None:
        super().__init__(inner)
        self._peer, self._hold, self._filler = peer, hold, filler

    async def send_data(self, peer: str, key: bytes, data: Any) -> None:
        if peer == self._peer and key.endswith(b"/h/0.0"):
            for i in range(math.ceil(self._hold)):  # stripes of it arrive all along
                if self._filler:
                    await self._inner.send_data(peer, b"other/%d/" % i + key, bytes(self._filler))
                await trio.sleep(1.0)
        await self._inner.send_data(peer, key, data)


@pytest.mark.parametrize("filler", [0, 1000])
async def test_a_left_neighbour_whose_link_is_busy_is_not_named_at_the_start_deadline(
    mock_clock: trio.testing.MockClock, filler: int
) -> None:
    """In a ring of two, p01's history reaches p00 only after the phase
    timeout. With data arriving from p01 meanwhile (its history queued
    behind it), p00 waits on to the data deadline and the round completes;
    with a silent link, p00 names p01 as never started at the phase timeout."""

    def wrap(f: MemFabric) -> HistoryBehindOtherData:
        return HistoryBehindOtherData(f, "p00", FAST.phase_timeout + 2, filler)

    # The data deadline far beyond the phase timeout, as for a large tensor.
    config = dataclasses.replace(FAST, min_bandwidth=1.0)
    async with swarm(2, config, wrap={"p01": wrap}) as s:
        start = trio.current_time()
        data = inputs(s.alive(), 64)
        arrays = {p: v.copy() for p, v in data.items()}
        ended: dict[str, float] = {}

        async def all_reduce(p: str, e: Engine) -> AllReduceResult:
            try:
                return await e.all_reduce(arrays[p], retry=False)
            finally:
                ended[p] = trio.current_time()

        out = await s.each(all_reduce)
        waited = ended["p00"] - start
        assert FAST.phase_timeout <= waited < FAST.phase_timeout + 10, waited
        if filler:
            assert sorted(assert_one_outcome(out, data, arrays)) == s.alive(), out
        else:
            assert isinstance(out["p00"], PeerLost) and out["p00"].peers == ("p01",), out
            assert "never started this all-reduce" in str(out["p00"])
            assert all(np.array_equal(arrays[p], data[p]) for p in s.alive())


@pytest.mark.parametrize("absent", ["p00", "p02"])
async def test_with_retry_the_survivors_of_an_absent_member_average_among_themselves(
    mock_clock: trio.testing.MockClock, absent: str
) -> None:
    async with swarm(4) as s:
        survivors = [p for p in s.alive() if p != absent]
        data = inputs(survivors, 97, seed=3)
        arrays = {p: v.copy() for p, v in data.items()}
        out = await s.each(lambda p, e: e.all_reduce(arrays[p]), survivors)
        assert sorted(assert_one_outcome(out, data, arrays)) == survivors, out
        assert all(r.attempts == 2 for r in out.values()), out
