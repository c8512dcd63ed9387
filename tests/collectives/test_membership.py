"""Round views on the engine: joins at boundaries, measured ring order, leaving."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from collectives import messages as m
from collectives.api import AllReduceResult, View
from collectives.run import Engine
from collectives.view import Decision
from peerd.errors import PeerLost, Timeout
from peerd.wire import decode_untrusted, encode
from tests.collectives.conftest import (
    FAST,
    RUN,
    Swarm,
    WrappedFabric,
    inputs,
    reference,
    same_bytes,
    swarm,
)


async def start_joiner(s: Swarm, peer: str) -> trio.Event:
    """Start ``peer`` and have it ask to join; the event is set once it is admitted."""
    joiner = await s.start(peer, None)
    joined = trio.Event()

    async def join() -> None:
        await joiner.join()
        joined.set()

    s.nursery.start_soon(join)
    return joined


async def exact_round(s: Swarm, peers: list[str], seed: int) -> None:
    """An all-reduce on ``peers``: each result covers exactly them, equals the
    float64 average and is byte-identical across them."""
    data = inputs(peers, 33, seed=seed)
    arrays = {p: v.copy() for p, v in data.items()}
    out = await s.each(lambda p, e: e.all_reduce(arrays[p]), peers)
    assert all(isinstance(r, AllReduceResult) and sorted(r.participants) == sorted(peers)
               for r in out.values()), out
    np.testing.assert_allclose(arrays[peers[-1]], reference(data, peers, True), rtol=1e-5)
    assert same_bytes(list(arrays.values()))


async def test_joiner_takes_part_from_the_next_round(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        members = s.alive()
        joined = await start_joiner(s, "p03")
        joiner = s.engines["p03"]
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # join requests are pending
        # round 1: the joiner waits; the others reduce among themselves
        data = inputs(members, 33, seed=1)
        out = await s.each(lambda p, e: e.all_reduce(data[p]), members)
        assert all(r.participants == tuple(members) for r in out.values())
        assert not joined.is_set() and joiner.current_view() is None
        # round boundary: the joiner is admitted
        views = await s.each(lambda p, e: e.update_view(), members)
        await joined.wait()
        assert {v.revision for v in views.values()} == {1}
        assert sorted(views["p00"].members) == ["p00", "p01", "p02", "p03"]
        assert joiner.view().members == views["p00"].members
        # round 2: everyone, the joiner included
        data = inputs(s.alive(), 33, seed=2)
        arrays = {p: v.copy() for p, v in data.items()}
        out = await s.each(lambda p, e: e.all_reduce(arrays[p]))
        assert all(sorted(r.participants) == s.alive() for r in out.values())
        np.testing.assert_allclose(arrays["p03"], reference(data, s.alive(), True), rtol=1e-5)
        assert same_bytes(list(arrays.values()))


async def held_back_until_healed(s: Swarm, members: list[str], wait: float) -> None:
    """p03 asks to join while its link to p01 does not work: after ``wait``
    the members agree a view without it and reduce among themselves; once
    the link heals, the next boundary admits it and all four reduce."""
    joined = await start_joiner(s, "p03")
    joiner = s.engines["p03"]
    await trio.sleep(wait)
    views = await s.each(lambda p, e: e.update_view(), members)
    assert {v.members for v in views.values()} == {views["p00"].members}
    assert sorted(views["p00"].members) == members, views
    await exact_round(s, members, seed=1)
    assert not joined.is_set() and joiner.current_view() is None

    s.net.heal("p01", "p03")
    await trio.sleep(2 * FAST.timing.heartbeat_interval)  # p01 and the joiner hear each other
    views = await s.each(lambda p, e: e.update_view(), members)
    await joined.wait()
    assert sorted(views["p01"].members) == s.alive() == ["p00", "p01", "p02", "p03"], views
    await exact_round(s, s.alive(), seed=2)


async def test_joiner_one_member_cannot_reach_waits_until_it_can(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A joiner that one member cannot reach (here the link p01-p03 is cut;
    on the internet, a NAT neither side gets through) is not admitted: in
    the ring that member would need a link to it, so every round would fail.
    The members go on among themselves, and admit it at the first boundary
    after the link works."""
    async with swarm(3) as s:
        s.add_fabric("p03")
        s.net.cut("p01", "p03")
        await held_back_until_healed(s, s.alive(), 2 * FAST.timing.heartbeat_interval)


async def test_joiner_claims_only_members_that_answered_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A joiner's session to a member can outlive their link (a silent cut:
    no reset; the session is known dead only at its idle timeout). The
    joiner must not claim it reaches that member before the member answered
    it: admitted on that claim, it would break the next ring. The members
    go on among themselves and admit it once the link works."""
    async with swarm(3) as s:
        members = s.alive()
        s.add_fabric("p03")
        s.net.blackhole("p01", "p03")
        assert "p01" in s.fabrics["p03"].peers()  # the session still looks alive
        # Within half an interval p00 and p02 have answered the joiner; its
        # request to p01 hangs (it times out after two intervals).
        await held_back_until_healed(s, members, FAST.timing.heartbeat_interval / 2)


async def test_two_joiners_that_cannot_reach_each_other_come_one_at_a_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Two joiners whose link is cut (each reaches every member): admitting
    both would fail every round, so the lower id comes in first, and the
    other only after the link works."""
    async with swarm(3) as s:
        for j in ("p03", "p04"):
            s.add_fabric(j)
        s.net.cut("p03", "p04")
        joined = {j: await start_joiner(s, j) for j in ("p03", "p04")}
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # join requests are pending
        members = ["p00", "p01", "p02"]
        for want in (["p00", "p01", "p02", "p03"], ["p00", "p01", "p02", "p03"]):
            views = await s.each(lambda p, e: e.update_view(), members)
            assert {tuple(sorted(v.members)) for v in views.values()} == {tuple(want)}, views
            members = want
            await joined["p03"].wait()
            await exact_round(s, members, seed=len(members))
            assert not joined["p04"].is_set()

        s.net.heal("p03", "p04")
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # p03 hears p04's request
        views = await s.each(lambda p, e: e.update_view(), members)
        await joined["p04"].wait()
        assert sorted(views["p03"].members) == s.alive() == [f"p0{i}" for i in range(5)]
        await exact_round(s, s.alive(), seed=5)


async def test_failure_retry_does_not_admit_joiners(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        joiner = await s.start("p09", None)
        s.nursery.start_soon(joiner.join)
        await trio.sleep(2 * FAST.timing.heartbeat_interval)
        s.kill("p02")
        survivors = ["p00", "p01"]
        data = inputs(survivors, 10)
        out = await s.each(lambda p, e: e.all_reduce(data[p]), survivors)
        for r in out.values():
            assert isinstance(r, AllReduceResult) and r.participants == ("p00", "p01")
        assert joiner.current_view() is None


async def test_ring_order_follows_measured_bandwidth(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(4) as s:
        slow = [("p00", "p01"), ("p02", "p03")]  # both are hops of the id-sorted ring
        for a, b in slow:
            s.net.set_link(a, b, latency=0.05, bandwidth=1e4)
        await trio.sleep(5 * FAST.timing.heartbeat_interval)  # probes and heartbeats measure
        views = await s.each(lambda p, e: e.update_view())
        ring = views["p00"].members
        assert all(v.members == ring for v in views.values())
        hops = {frozenset((ring[i], ring[(i + 1) % 4])) for i in range(4)}
        assert not hops & {frozenset(p) for p in slow}
        # and the data flows along that ring: nothing crosses a slow link
        before = dict(s.net.bytes_sent)
        await s.each(lambda p, e: e.all_reduce(np.ones(64, np.float32)))
        for a, b in slow:
            for link in ((a, b), (b, a)):
                moved = s.net.bytes_sent.get(link, 0) - before.get(link, 0)
                assert moved < 64  # at most a one-byte status, never tensor blocks


async def test_update_view_without_changes_keeps_members(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with swarm(3) as s:
        views = await s.each(lambda p, e: e.update_view())
        assert {v.revision for v in views.values()} == {1}
        assert all(sorted(v.members) == s.alive() for v in views.values())
        # One ballot, by the lowest id, accepted without a prepare round.
        stats = {p: e.statistics() for p, e in s.engines.items()}
        assert [(p, st.ballots, st.ballots_failed) for p, st in stats.items()
                if st.ballots] == [("p00", 1, 0)], stats


async def test_a_member_left_out_at_a_boundary_rejoins_at_its_own_next_one(
    mock_clock: trio.testing.MockClock,
) -> None:
    """p02 does not come to a boundary (its training process is elsewhere); the
    others agree a view without it once the view timeout passes. Its own
    update_view, before any heartbeat told it, is refused by the coordinator:
    that boundary readmits it (it joins, and the others' next boundary takes
    it in) rather than raising ``Evicted`` at every call."""
    async with swarm(3) as s:
        views = await s.each(lambda p, e: e.update_view(), ["p00", "p01"])
        assert all(sorted(v.members) == ["p00", "p01"] for v in views.values()), views
        p02 = s.engines["p02"]
        assert p02.current_view() is not None  # it does not know yet

        async def boundary(p: str, e: Engine) -> View:
            if p == "p02":
                return await e.update_view()
            for _ in range(30):  # a training loop's steps, each ending at a boundary
                v = await e.update_view()
                if "p02" in v.members:
                    return v
                await trio.sleep(FAST.timing.heartbeat_interval)
            raise AssertionError("p02 was never admitted again")

        views = await s.each(boundary)
        assert all(sorted(v.members) == s.alive() for v in views.values()), views
        assert len({v.revision for v in views.values()}) == 1
        out = await s.each(lambda p, e: e.all_reduce(np.ones(48, np.float32)))
        assert all(r.participants == tuple(s.alive()) for r in out.values()), out


async def test_coordinator_dies_during_view_change(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(4) as s:
        s.net.stall("p00")  # the coordinator stops answering, then is killed
        await trio.sleep(1)
        s.kill("p00")
        views = await s.each(lambda p, e: e.update_view())
        assert sorted(views) == ["p01", "p02", "p03"]
        assert all(sorted(v.members) == ["p01", "p02", "p03"] for v in views.values())


async def test_leave(mock_clock: trio.testing.MockClock) -> None:
    async with swarm(3) as s:
        leaver: Engine = s.engines["p02"]
        await leaver.leave()
        assert leaver.current_view() is None
        survivors = ["p00", "p01"]
        data = inputs(survivors, 9)
        out = await s.each(lambda p, e: e.all_reduce(data[p]), survivors)
        assert all(r.participants == ("p00", "p01") for r in out.values())
        stats = s.engines["p00"].statistics()
        assert stats.members == ("p00", "p01") and stats.peers_lost == 1
        assert stats.all_reduces == 1 and stats.failed_attempts == 1


async def test_restarted_member_is_dropped_at_once_and_joins_again(
    mock_clock: trio.testing.MockClock,
) -> None:
    """p02's process is replaced by a new one with the same id (a crash and a
    quick restart): the new engine must not take the old one's place in the
    view it never saw a round of, the survivors must drop the old process by
    its new incarnation well before the heartbeat timeout (the new process
    answers every call, so silence never shows it), and the new process joins
    at the next boundary."""
    async with swarm(3) as s:
        await trio.sleep(3 * FAST.timing.heartbeat_interval)  # incarnations heard
        before = s.engines["p00"].view().revision
        s.scopes["p02"].cancel()  # the old process is gone without a word...
        del s.engines["p02"]
        await trio.testing.wait_all_tasks_blocked()  # its handlers are unregistered
        reborn = await s.start("p02", None)  # ...and its id is back at once
        joined = trio.Event()

        async def join() -> None:
            await reborn.join()
            joined.set()

        s.nursery.start_soon(join)
        survivors = ["p00", "p01"]
        data = inputs(survivors, 40, seed=3)
        arrays = {p: v.copy() for p, v in data.items()}
        start = trio.current_time()
        out = await s.each(lambda p, e: e.all_reduce(arrays[p]), survivors)
        assert trio.current_time() - start < FAST.timing.heartbeat_timeout
        for r in out.values():
            assert isinstance(r, AllReduceResult) and r.participants == tuple(survivors), r
        np.testing.assert_allclose(arrays["p00"], reference(data, survivors, True), rtol=1e-5)
        assert same_bytes(list(arrays.values()))
        assert reborn.current_view() is None  # never adopted a view with the old process
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # its join requests are pending
        views = await s.each(lambda p, e: e.update_view(), survivors)
        await joined.wait()
        assert sorted(views["p00"].members) == ["p00", "p01", "p02"]
        got = reborn.view()
        assert (got.revision, got.members) == (views["p00"].revision, views["p00"].members)
        assert got.revision > before + 1  # a view without the old process came first


class SlowToHear(WrappedFabric):
    """A member whose heartbeats to the peers in ``deaf_to`` go unanswered
    (their answers are late: a busy machine, a long path)."""

    deaf_to: frozenset[str] = frozenset()

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes:
        if peer in self.deaf_to and method.endswith("/hb"):
            raise Timeout(f"call {method} to {peer} took longer than {timeout}s")
        reply: bytes = await self._inner.call(peer, method, payload, timeout)
        return reply


async def test_a_member_away_while_another_restarted_takes_its_new_process_from_the_view(
    mock_clock: trio.testing.MockClock,
) -> None:
    """p04 is stopped while p02 crashes and restarts; the others drop both,
    then admit p02's new process. The new process was not connected to p04 and
    its answers to p04 are slow, so p04 has heard only the old process when it
    is admitted again. The view it is admitted to names p02's new process:
    p04 must take that, not the new process's first word, for p02's restart
    (it dropped p02 again, and every member with it, in the soak that found
    this). Five rounds later nobody has lost anyone and all five reduce."""
    async with swarm(5, wrap={"p04": SlowToHear}) as s:
        await trio.sleep(3 * FAST.timing.heartbeat_interval)  # incarnations heard
        away = s.engines["p04"]
        s.fabrics["p04"].deaf_to = frozenset({"p02"})
        s.net.cut("p02", "p04")
        s.net.stall("p04")
        s.scopes["p02"].cancel()
        del s.engines["p02"]
        await trio.testing.wait_all_tasks_blocked()
        reborn = await s.start("p02", None)
        joined = trio.Event()

        async def join() -> None:
            await reborn.join()
            joined.set()

        s.nursery.start_soon(join)
        here = ["p00", "p01", "p03"]
        await trio.sleep(FAST.timing.heartbeat_timeout + 1)  # p04 is silent too
        views = await s.each(lambda p, e: e.update_view(), here)
        assert all(v.members == views["p00"].members for v in views.values()), views
        assert sorted(views["p00"].members) == here
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # p02's requests are pending
        await s.each(lambda p, e: e.update_view(), here)
        await joined.wait()

        s.net.heal("p02", "p04")
        s.net.resume("p04")
        back = trio.Event()

        async def rejoin() -> None:
            await away.update_view()
            back.set()

        s.nursery.start_soon(rejoin)
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # p04's requests are pending
        views = await s.each(lambda p, e: e.update_view(), [*here, "p02"])
        await back.wait()
        admitted = away.view()
        assert sorted(admitted.members) == s.alive(), admitted
        lost = {p: e.statistics().peers_lost for p, e in s.engines.items()}

        s.fabrics["p04"].deaf_to = frozenset()
        await trio.sleep(5 * FAST.timing.heartbeat_interval)
        assert {p: e.statistics().peers_lost for p, e in s.engines.items()} == lost
        assert {e.view().revision for e in s.engines.values()} == {admitted.revision}
        await exact_round(s, s.alive(), seed=4)


class JoinsThrough(WrappedFabric):
    """A joiner whose requests reach only the members in ``through``."""

    through: frozenset[str] = frozenset()

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes:
        if method.endswith("/join") and peer not in self.through:
            raise Timeout(f"call {method} to {peer} took longer than {timeout}s")
        reply: bytes = await self._inner.call(peer, method, payload, timeout)
        return reply


async def test_a_joiner_is_admitted_as_the_process_that_asked(
    mock_clock: trio.testing.MockClock, one_view_per_revision: dict[int, set[Decision]],
) -> None:
    """The coordinator (p00) heard p03's request, then installed a view without
    it (the others had not heard p03 yet), which forgets what it heard of
    non-members. p03's later requests reach only the others. The view that
    admits p03 must still name the process that asked, or members that never
    heard p03 take its first heartbeat on trust."""
    async with swarm(3) as s:
        s.add_fabric("p03", JoinsThrough)
        s.fabrics["p03"].through = frozenset({"p00"})
        joined = await start_joiner(s, "p03")
        await trio.sleep(2 * FAST.timing.heartbeat_interval)  # p00 heard the request
        views = await s.each(lambda p, e: e.update_view(), ["p00", "p01", "p02"])
        assert all("p03" not in v.members for v in views.values()), views
        s.fabrics["p03"].through = frozenset({"p01", "p02"})
        await trio.sleep(FAST.timing.heartbeat_interval)  # the others heard it
        await s.each(lambda p, e: e.update_view(), ["p00", "p01", "p02"])
        await joined.wait()
        admitted = max(one_view_per_revision)
        (view,) = one_view_per_revision[admitted]
        assert "p03" in view.members, view
        assert view.incarnation_of("p03") == s.engines["p03"].incarnation, view
        await exact_round(s, s.alive(), seed=5)


class NextVersionJoiner(WrappedFabric):
    """A joiner that speaks a later collectives protocol than the members."""

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes:
        if method.endswith("/join"):
            request = decode_untrusted(payload, expect=m.JoinRequest)
            payload = encode(dataclasses.replace(request, version=m.PROTOCOL_VERSION + 1))
        reply: bytes = await self._inner.call(peer, method, payload, timeout)
        return reply


async def test_a_joiner_of_another_protocol_version_is_told_what_to_change(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Views travel in a form only peers of one protocol version read, so a
    joiner of another is refused, and its timeout says why and what to do."""
    async with swarm(2) as s:
        s.add_fabric("p02", NextVersionJoiner)
        joiner = await s.start("p02", None)
        with pytest.raises(Timeout) as caught:
            await joiner.join(timeout=3 * FAST.timing.heartbeat_interval)
        assert f"collectives protocol {m.PROTOCOL_VERSION}, this joiner " in str(caught.value)
        assert "run the same peerd version" in str(caught.value)
        views = await s.each(lambda p, e: e.update_view(), ["p00", "p01"])
        assert all(v.members == ("p00", "p01") for v in views.values()), views


class TopBallotVoter(WrappedFabric):
    """A member whose every vote refuses, naming the highest ballot there is."""

    def register(self, method: str, handler: Any) -> None:
        if method.endswith(("/prepare", "/accept")):
            async def refuse(peer: str, payload: bytes) -> bytes:
                return encode(m.ViewVote(RUN, False, m.BallotId(m.MAX_BALLOT - 1, "p01")))

            handler = refuse
        self._inner.register(method, handler)


async def test_a_vote_naming_the_top_ballot_fails_ballots_but_harms_nothing(
        mock_clock: trio.testing.MockClock) -> None:
    """With p02 dead, p00's ballots need p01's vote, and p01 refuses each
    one, naming the highest ballot number there is. No ballot can go above
    it: p00's later ballots fail at once (they would not fit on the wire),
    the boundary ends in ``PeerLost`` rather than a crashed engine, and no
    view is installed."""
    async with swarm(3, wrap={"p01": TopBallotVoter}) as s:
        s.kill("p02")
        out = await s.each(lambda p, e: e.update_view())
        assert all(isinstance(r, PeerLost) for r in out.values()), out
        stats = s.engines["p00"].statistics()
        assert stats.revision == 0 and stats.ballots >= 2, stats
        assert stats.ballots_failed == stats.ballots, stats
