"""Rejoining after a partition: the pure decisions (exhaustive and hypothesis),
the membership core's stranded state, and the driver's probe handling."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from collectives import messages as m
from collectives.membership import Membership, Timing
from collectives.view import Decision, has_quorum, probe_targets, stranded
from peerd.errors import Evicted, PeerLost
from peerd.wire import decode_untrusted, encode

from .conftest import FAST, RUN, run_while_p00_is_stranded, swarm, uneven_links

MEMBERS = ("a", "b", "c", "d", "e")


def subsets(items: tuple[str, ...]) -> list[frozenset[str]]:
    return [frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


# ------------------------------------------------------------------ pure decisions


def test_probe_targets_exhaustively() -> None:
    for me in (*MEMBERS, "x"):  # x: not a member of the view
        for suspects in subsets((*MEMBERS, "y")):  # y: a suspect outside the view
            got = probe_targets(MEMBERS, me, suspects)
            lost = (suspects & set(MEMBERS)) - {me}
            if me not in MEMBERS or has_quorum(MEMBERS, set(MEMBERS) - lost):
                assert got == frozenset(), (me, suspects)
            else:
                assert got == lost, (me, suspects)


def test_stranded_exhaustively() -> None:
    checked = 0
    for me in (*MEMBERS, "x"):
        for suspects in subsets(MEMBERS):
            for newer in subsets((*MEMBERS, "z")):  # z reports newer but is no member
                got = stranded(MEMBERS, me, suspects, newer)
                alive = set(MEMBERS) - (suspects - {me})
                moved_on = (newer & set(MEMBERS)) - {me}
                want = me in MEMBERS and bool(moved_on) and not has_quorum(MEMBERS, alive)
                assert got == want, (me, suspects, newer)
                checked += got
    assert checked > 0  # the interesting case occurs


def test_minority_of_a_split_is_stranded_majority_never() -> None:
    big, small = {"a", "b", "c"}, {"d", "e"}
    for me in small:
        assert probe_targets(MEMBERS, me, big) == big
        assert not stranded(MEMBERS, me, big, ())  # nobody answered yet
        assert stranded(MEMBERS, me, big, {"b"})  # "b" went on
        # The other minority peer is already back in a newer view: so is the run.
        assert stranded(MEMBERS, me, big, {"e" if me == "d" else "d"})
        assert not stranded(MEMBERS, me, big, {me})  # its own word does not count
    for me in big:
        assert probe_targets(MEMBERS, me, small) == frozenset()
        assert not stranded(MEMBERS, me, small, small)


ids = st.sampled_from([f"p{i}" for i in range(9)])


@given(members=st.frozensets(ids, min_size=1), side=st.frozensets(ids),
       newer=st.frozensets(ids))
def test_no_side_of_a_split_both_stays_and_strands(members: frozenset[str],
                                                  side: frozenset[str],
                                                  newer: frozenset[str]) -> None:
    """Split ``members`` into ``side`` and the rest: at most one side may go
    on; a stranded peer is always on a side that cannot, and a peer that
    probes is always on a side that cannot."""
    view = tuple(sorted(members))
    a, b = members & side, members - side
    assert not (has_quorum(view, a) and has_quorum(view, b))
    for here, there in ((a, b), (b, a)):
        for me in here:
            can_go_on = has_quorum(view, here)
            if stranded(view, me, there, newer):
                assert not can_go_on
                assert probe_targets(view, me, there)  # it got there by probing
            if probe_targets(view, me, there):
                assert not can_go_on


# ------------------------------------------------------------------ membership core


def core_of(me: str, members: tuple[str, ...] = MEMBERS) -> Membership:
    core = Membership(me, Timing(heartbeat_interval=1.0, heartbeat_timeout=5.0))
    core.install(Decision(0, members), 0.0)
    return core


def test_core_strands_only_on_a_newer_revision_from_a_member_without_quorum() -> None:
    core = core_of("d")
    core.suspect({"a"})
    assert not core.reported("b", 3)  # with a quorum: a commit missed, the next ready fixes it
    assert core.is_member
    core = core_of("d")
    core.suspect({"a", "b", "c"})
    assert core.probes() == {"a", "b", "c"}
    assert not core.reported("a", 0)  # same revision: nothing moved on
    assert not core.reported("x", 9)  # not a member of the view
    assert core.is_member
    assert core.reported("b", 1)
    assert core.stranded and not core.is_member


def test_core_strands_when_a_member_holds_its_revision_without_it() -> None:
    """Two views of one revision: whatever the quorum says (here every member
    answers), a member that holds this revision without this peer strands it;
    the same answer from a member that holds it with this peer, from a member
    at an older revision, or from a stranger does not."""
    core = core_of("d")
    assert not core.reported("b", 0)
    assert not core.reported("b", 0, excluded=False)
    assert not core.reported("x", 0, excluded=True)  # not a member of the view
    core.install(Decision(1, MEMBERS), 1.0)
    assert not core.reported("b", 0, excluded=True)  # behind us: says nothing of revision 1
    assert core.is_member
    assert core.reported("b", 1, excluded=True)
    assert core.stranded and not core.is_member
    assert core.install(Decision(2, MEMBERS), 2.0)  # readmitted
    assert core.is_member and not core.stranded


def test_core_strands_when_a_later_view_leaves_it_out() -> None:
    """A member that answers from a later revision whose view leaves this peer
    out strands it at once, however many members this peer still hears (it
    keeps a quorum of its own view here); from a later view that holds this
    peer, the answer only says the run moved on."""
    core = core_of("a")
    assert not core.reported("b", 1, excluded=False)
    assert core.is_member and not core.stranded
    assert core.reported("c", 1, excluded=True)
    assert core.stranded and not core.is_member
    assert core.install(Decision(2, MEMBERS), 2.0)  # readmitted
    assert core.is_member and not core.stranded


def test_core_rejoin_starts_afresh() -> None:
    core = core_of("d")
    core.suspect({"a", "b", "c"})
    core.reported("a", 1)
    assert core.stranded
    # Admitted into revision 2 after a long partition (now = 100 s).
    assert core.install(Decision(2, MEMBERS), 100.0)
    assert core.is_member and not core.stranded
    assert core.suspects == set()
    assert core.expired(104.0) == frozenset()  # old silences do not count
    assert core.expired(106.0) == {"a", "b", "c", "e"}
    assert core.probes() == frozenset()


def test_core_install_of_an_older_view_does_not_unstrand() -> None:
    core = core_of("d")
    core.suspect({"a", "b", "c"})
    core.reported("c", 4)
    assert not core.install(Decision(0, MEMBERS), 1.0)
    assert core.stranded


# ------------------------------------------------------------------ driver


async def test_probe_naming_the_receiver_makes_it_drop_the_sender(
        mock_clock: trio.testing.MockClock) -> None:
    """A heartbeat whose sender found its receiver gone comes from across a
    partition: the receiver drops the sender, and not the sender's suspects
    (they are on the receiver's own side)."""
    async with swarm(5) as s:
        e = s.engines["p00"]
        gone = ("p00", "p01", "p02")
        hb = m.Heartbeat(RUN, 0, gone, observed=gone)
        reply = decode_untrusted(await e._on_heartbeat("p04", encode(hb)), expect=m.Ack)
        assert reply.revision == 0
        assert e.core.suspects == {"p04"}
        # A heartbeat of another revision changes nothing.
        stale = m.Heartbeat(RUN, 7, ("p00", "p01"), observed=("p00",))
        await e._on_heartbeat("p03", encode(stale))
        assert e.core.suspects == {"p04"}


async def test_a_loss_passed_on_names_no_link(mock_clock: trio.testing.MockClock) -> None:
    """A member that was only told this peer is gone can still reach it: a
    heartbeat or an abort naming this peer without having observed it makes
    this peer drop neither the sender nor the sender's other suspects (a
    heartbeat) and only the others named (an abort)."""
    async with swarm(5) as s:
        e = s.engines["p00"]
        hb = m.Heartbeat(RUN, 0, ("p00", "p01"), observed=("p01",))
        await e._on_heartbeat("p04", encode(hb))
        assert e.core.suspects == set()
        abort = m.Abort(RUN, 0, ("p00", "p02"), "told by p01", observed=("p02",))
        await e._on_abort("p03", encode(abort))
        assert e.core.suspects == {"p02"} and e.core.observed == set()
        # The same abort from a member that found this peer gone itself.
        found = m.Abort(RUN, 0, ("p00",), "silent", observed=("p00",))
        await e._on_abort("p04", encode(found))
        assert e.core.suspects == {"p02", "p04"} and e.core.observed == {"p04"}


async def test_an_abort_that_names_this_peer_is_passed_on_in_one_message(
        mock_clock: trio.testing.MockClock) -> None:
    """A member that found this peer gone and reports a third one costs this
    peer one abort to each remaining member, naming both."""
    async with swarm(5) as s:
        e = s.engines["p00"]
        sent: list[tuple[str, m.Abort]] = []

        async def spy(peer: str, name: str, payload: bytes) -> None:
            if name == "abort":
                sent.append((peer, decode_untrusted(payload, expect=m.Abort)))

        e._quiet_call = spy  # type: ignore[method-assign]
        abort = m.Abort(RUN, 0, ("p00", "p02"), "silent", observed=("p00", "p02"))
        await e._on_abort("p04", encode(abort))
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(peer for peer, _ in sent) == ["p01", "p03"]
        assert all(msg.lost == ("p02", "p04") and msg.observed == ("p04",) for _, msg in sent)


async def test_a_stopped_peer_learns_on_its_next_call_that_the_others_went_on(
        mock_clock: trio.testing.MockClock) -> None:
    """Stalled past the heartbeat timeout (what SIGSTOP does to a process) while
    the others formed a view without it: running again, it finds every member
    silent, so it holds no quorum. Its next call waits for their answers to its
    probes and raises ``Evicted`` (rejoin at the next boundary), not a lost
    quorum that no retry could mend."""
    async with swarm(3) as s:
        s.net.stall("p02")
        views = await s.each(lambda p, e: e.update_view(), ["p00", "p01"])
        assert all(not isinstance(v, PeerLost) and v.members == ("p00", "p01")
                   for v in views.values()), views
        e = s.engines["p02"]
        with trio.fail_after(30):
            while not {"p00", "p01"} <= e.core.suspects:
                await e.changed().wait()
        assert not e.core.stranded
        s.net.resume("p02")
        out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=True),
                           ["p02"])
        assert isinstance(out["p02"], Evicted), out
        assert e.core.stranded and e.current_view() is None


async def test_minority_stays_put_until_the_majority_moves_on(
        mock_clock: trio.testing.MockClock) -> None:
    """Healed before the majority formed a new view: the minority must not
    strand itself on its own side's answers, and it never forms a view."""
    async with swarm(5) as s:
        big, small = ["p00", "p01", "p02"], ["p03", "p04"]
        for x in big:
            for y in small:
                s.net.cut(x, y)
        out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=True),
                           small)
        assert all(isinstance(r, PeerLost) and "no quorum" in str(r) for r in out.values())
        for p in small:
            assert s.engines[p].core.view == Decision(0, tuple(sorted(big + small)))
            assert not s.engines[p].core.stranded
        # The majority has not run anything: its view is still revision 0,
        # so healing does not strand anyone; the probes make it drop them.
        for x in big:
            for y in small:
                s.net.heal(x, y)
        with trio.fail_after(30):
            while not {"p03", "p04"} <= s.engines["p00"].core.suspects:
                await s.engines["p00"].changed().wait()
        assert not any(s.engines[p].core.stranded for p in small)
        views = await s.each(lambda p, e: e.update_view(), big)
        # ...it goes on without them; its answer to their next probe strands them.
        assert all(not isinstance(v, PeerLost) and sorted(v.members) == big and v.revision == 1
                   for v in views.values()), views
        with trio.fail_after(30):
            for p in small:
                while not s.engines[p].core.stranded:
                    await s.engines[p].changed().wait()


async def test_members_recover_from_a_flap_that_left_no_quorum(
        mock_clock: trio.testing.MockClock) -> None:
    """A link among three members breaks and comes back: suspicion spreads
    until no member holds a quorum; hearing from each other again, they
    recover and form a view instead of stalling for good."""
    async with swarm(3) as s:
        s.net.cut("p00", "p01")
        out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=False))
        assert all(isinstance(r, PeerLost) for r in out.values()), out
        s.net.heal("p00", "p01")
        await trio.sleep(30)
        with trio.fail_after(120):
            out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=True))
        ok = {p for p, r in out.items() if not isinstance(r, PeerLost)}
        assert len(ok) == 2, out  # the two that kept a quorum between them
        (loser,) = set(out) - ok
        with trio.fail_after(30):  # its probes learn that the other two went on
            while not s.engines[loser].core.stranded:
                await s.engines[loser].changed().wait()
        views = await s.each(lambda p, e: e.update_view())  # and it rejoins
        assert all(not isinstance(v, PeerLost) for v in views.values()), (out, views)
        assert {(v.revision, v.members) for v in views.values()} == {
            (views["p00"].revision, ("p00", "p01", "p02"))}, views



async def _one_view_among_members(s: Any) -> Decision:
    """Wait until every peer in good standing holds one and the same view
    (woken by any engine's change: a view installed, a peer stranded)."""
    with trio.fail_after(30):
        while True:
            views = {e.core.view for e in s.engines.values() if e.core.is_member}
            if len(views) == 1:
                return views.pop()
            async with trio.open_nursery() as nursery:
                for e in s.engines.values():
                    nursery.start_soon(_wait_then_cancel, e.changed(), nursery.cancel_scope)


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@pytest.mark.parametrize("trial", range(8))  # the two proposals race differently
async def test_a_view_change_with_two_coordinators_chooses_one_view(
        mock_clock: trio.testing.MockClock, trial: int) -> None:
    """A link between the coordinator and a member is cut during a view change.
    That member's ready never arrives; it suspects the coordinator and tells the
    third member, whose ready the coordinator may already hold, and both go on
    to the next coordinator: each coordinator proposes revision 1, with
    different members. One of them is chosen (``mock_clock`` checks that no
    peer installs the other; without ballots both were, in one trial of
    eight). The side it leaves out must not go on (as the lower id of a pair
    it would, alone, training apart from the run for good): it is stranded,
    and it rejoins."""
    async with swarm(3) as s:
        s.net.cut("p00", "p01")
        await s.each(lambda p, e: e.update_view())
        view = await _one_view_among_members(s)
        assert view.revision == 1 and len(view.members) == 2, view
        out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=True))
        for p, r in out.items():
            if p in view.members:
                assert r.participants == view.members, out
            else:
                assert isinstance(r, Evicted), out
        s.net.heal("p00", "p01")
        (left_out,) = set(s.engines) - set(view.members)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.engines[left_out].join)
            await trio.sleep(2 * FAST.timing.heartbeat_interval)  # its join requests are pending
            await s.each(lambda p, e: e.update_view(), list(view.members))
        out = await s.each(lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=True))
        assert {r.participants for r in out.values()} == {("p00", "p01", "p02")}, out


@pytest.mark.parametrize("trial", range(8))
async def test_a_peer_stranded_mid_round_raises_evicted_at_once(
        mock_clock: trio.testing.MockClock, trial: int) -> None:
    """As above with four peers and the link p00-p03 cut: the others' revision
    1 leaves p00 out, and p00 still holds revision 0. Its all-reduce on that
    view waits for members that went on; their
    heartbeat answers strand p00 within an interval or two, and the round
    must end there with ``Evicted`` rather than at its phase deadline (before:
    30 s here, the deadline plus size / 10 Mbit/s in a real run)."""
    members, out = await run_while_p00_is_stranded(
        lambda p, e: e.all_reduce(np.ones(4, np.float32), retry=True))
    assert all(r.participants == members for p, r in out.items() if p != "p00"), out


async def test_a_ring_waiting_on_members_that_went_on_ends_when_stranded(
        mock_clock: trio.testing.MockClock) -> None:
    """p00's ring waits for data from members that never send it (they went
    on without p00, and nobody suspects them). The moment an answer from a
    later view that leaves p00 out strands it, the ring ends with
    ``Evicted`` instead of waiting for the phase deadline."""
    async with swarm(3) as s:
        e = s.engines["p00"]
        d = e.core.view
        assert d is not None

        async def answer_from_a_later_view() -> None:
            await trio.sleep(1.0)
            e._answered("p01", d.revision + 1, excluded=True)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_from_a_later_view)
            with pytest.raises(Evicted, match="went on without this peer"):
                await e.all_reduce(np.ones(4, np.float32), retry=True)
        assert trio.current_time() - start < FAST.phase_timeout / 3


@pytest.mark.parametrize("trial", range(4))
async def test_a_coordinator_cut_off_mid_round_is_evicted_at_once(
        mock_clock: trio.testing.MockClock, trial: int) -> None:
    """The link between the coordinator p00 and p01 is cut mid-round. p01
    reports p00 lost, and the other three go on in revision 1 without it.
    p00 sees only p01 gone and still holds a quorum of revision 0, so it
    tries to coordinate the next view itself. The answers of the members it
    still hears come from revision 1, which leaves it out: they must strand
    it, and its retry must end there with ``Evicted``. Before this, it waited
    out the view timeouts and got ``Evicted`` after 52 s."""
    async with swarm(4) as s:
        uneven_links(s, trial)

        async def cut() -> None:
            await trio.sleep(0.05)
            s.net.cut("p00", "p01")

        start = trio.current_time()
        done: dict[str, float] = {}

        async def round_(p: str, e: Any) -> Any:
            try:
                return await e.all_reduce(np.ones(4096, np.float32), retry=True)
            finally:
                done[p] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut)
            out = await s.each(round_)
        assert isinstance(out["p00"], Evicted), out
        assert all(out[p].participants == ("p01", "p02", "p03") for p in ("p01", "p02", "p03"))
        assert done["p00"] < FAST.phase_timeout / 3, done


async def test_heartbeat_answers_say_whether_the_view_holds_the_caller(
        mock_clock: trio.testing.MockClock) -> None:
    """``Ack.knows_you``: whether the answering member's view holds the caller;
    a stranded member's view is dead, so its answers claim nothing."""
    async with swarm(3) as s:
        e = s.engines["p00"]

        def ack_to(peer: str) -> m.Ack:
            return decode_untrusted(e._ack(peer), expect=m.Ack)

        assert ack_to("p01").knows_you
        assert not ack_to("p07").knows_you
        e.core.suspect({"p01", "p02"})
        e.core.reported("p01", 5)  # the others went on without it
        assert e.core.stranded
        assert ack_to("p07").knows_you
