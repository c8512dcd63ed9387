"""View agreement: pure decisions, checked exhaustively on small swarms."""

from __future__ import annotations

import itertools

import pytest

from collectives.incarnation import Incarnations
from collectives.membership import Membership, NotMember, Pending, Retry, Timing
from collectives.view import (
    Decision,
    Ready,
    coordinator_of,
    decide_view,
    has_quorum,
    initial_view,
)

MEMBERS = ("a", "b", "c", "d")
JOINERS = ("x", "y")


def subsets(items: tuple[str, ...]) -> list[frozenset[str]]:
    return [frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


def test_coordinator_is_lowest_unsuspected() -> None:
    assert coordinator_of(MEMBERS) == "a"
    assert coordinator_of(MEMBERS, {"a"}) == "b"
    assert coordinator_of(MEMBERS, {"a", "b", "c"}) == "d"
    assert coordinator_of(MEMBERS, set(MEMBERS)) is None
    assert coordinator_of(("b", "a")) == "a"  # independent of ring order


def test_decide_view_exhaustively() -> None:
    checked = 0
    cases = itertools.product(
        subsets((*MEMBERS, "z")),  # ready peers; z: one that is not a member
        subsets(MEMBERS),  # suspects
        subsets(JOINERS),  # joiners the coordinator heard from
        (False, True),  # one ready member never heard from joiner "x"...
        (False, True),  # ...but x says it reaches that member
        (True, False),  # the joiners x and y reach each other
        (True, False),  # every ready member admits joiners
        (False, True),  # the deadline passed
    )
    for ready_set, suspects, joiners, deaf_to_x, claims, linked, admit_all, passed in cases:
        ready = ready_set & set(MEMBERS)
        deaf = max(ready) if deaf_to_x and ready else None
        readies = {
            p: Ready(p, 3, MEMBERS, admit=admit_all or p != min(ready_set),
                     joiners=frozenset(JOINERS) - ({"x"} if p == deaf else set()))
            for p in ready_set
        }
        # The joiners reach every member (x the deaf one only if it claims so),
        # and x and y each other when linked.
        reach = {j: frozenset(MEMBERS) - ({deaf} if j == "x" and not claims else set())
                 | ({"x", "y"} - {j} if linked else set()) for j in joiners}
        got = decide_view(3, MEMBERS, readies, suspects, reach, passed)
        expected = set(MEMBERS) - suspects
        chosen = ready & expected
        # Quorum: a strict majority of the 4 members, or exactly
        # half including the lowest id ("a").
        quorum = len(chosen) >= 3 or (len(chosen) == 2 and "a" in chosen)
        if (not passed and not expected <= ready) or not quorum:
            assert got is None
            continue
        assert got is not None
        admit = all(readies[p].admit for p in ready)
        reachable = set(joiners) - ({"x"} if deaf and not claims else set())
        if not linked and reachable == {"x", "y"}:
            reachable = {"x"}  # the lower id of two that cannot reach each other
        want = chosen | (reachable if admit else set())
        assert got.revision == 4
        assert sorted(got.members) == sorted(want), (ready_set, suspects, joiners, deaf)
        assert "z" not in got.members
        checked += 1
    assert checked > 7200


def test_quorum_rule() -> None:
    assert has_quorum("abcd", "abc") and has_quorum("abcd", "bcd")
    assert has_quorum("abcd", "ab") and not has_quorum("abcd", "cd")
    assert not has_quorum("abcd", "a") and not has_quorum("abcd", "")
    assert has_quorum("ab", "a") and not has_quorum("ab", "b")
    assert has_quorum("a", "a")
    assert has_quorum("abc", "abcz")  # outsiders neither help nor hurt
    # The two sides of any split never both have a quorum.
    for side in subsets(MEMBERS):
        other = set(MEMBERS) - side
        assert not (has_quorum(MEMBERS, side) and has_quorum(MEMBERS, other))


def test_initial_view_is_sorted_revision_zero() -> None:
    assert initial_view(["c", "a", "b"]) == Decision(0, ("a", "b", "c"))


# ---------------------------------------------------------------- Membership core

T = Timing(heartbeat_interval=1.0, heartbeat_timeout=5.0, view_timeout=20.0)


def core(me: str, members: tuple[str, ...] = MEMBERS, revision: int = 0) -> Membership:
    m = Membership(me, T)
    m.install(Decision(revision, members), now=0.0)
    return m


def ready(peer: str, revision: int = 0, **kw: object) -> Ready:
    return Ready(peer, revision, kw.pop("members", MEMBERS), **kw)  # type: ignore[arg-type]


def decide(c: Membership, now: float) -> Decision | None:
    """The coordinator's proposal, installed as if its ballot were chosen
    (``collectives.ballot``; the driver runs the ballot)."""
    d = c.proposal(now)
    if d is not None:
        assert c.install(d, now)
    return d


def offer(c: Membership, r: Ready, now: float) -> object:
    """A ready reaches the coordinator ``c``: its outcome, or the view decided
    with it."""
    out = c.offer(r, now)
    if isinstance(out, Pending):
        return decide(c, now) or out
    return out


def test_coordinator_decides_when_everyone_is_ready() -> None:
    c = core("a")
    for p in ("b", "c", "d"):
        assert offer(c, ready(p), 1.0) == Pending(0)
    decision = offer(c, ready("a"), 2.0)
    assert isinstance(decision, Decision)
    assert decision.revision == 1 and sorted(decision.members) == list(MEMBERS)
    assert c.view == decision
    assert c.answer("b", 0) == decision
    assert c.answer("b", 1) is None


def test_missing_member_is_dropped_at_the_deadline() -> None:
    c = core("a")
    offer(c, ready("a"), 1.0)
    offer(c, ready("b"), 2.0)
    assert decide(c, 20.9) is None
    assert c.deadline() == 21.0
    decision = decide(c, 21.0)
    assert decision is not None and sorted(decision.members) == ["a", "b"]
    assert isinstance(c.answer("c", 0), NotMember)


def test_suspects_travel_with_readies_and_move_the_coordinator() -> None:
    c = core("b")
    assert isinstance(offer(c, ready("c"), 1.0), Retry)  # a is alive as far as b knows
    out = offer(c, ready("d", suspects=frozenset({"a"})), 1.0)
    assert out == Pending(0) and c.coordinator() == "b"
    offer(c, ready("c"), 1.5)
    decision = offer(c, ready("b"), 2.0)
    assert isinstance(decision, Decision) and sorted(decision.members) == ["b", "c", "d"]


def test_late_ready_gets_the_view_it_missed() -> None:
    c = core("a", revision=5)
    assert offer(c, ready("b", revision=4), 1.0) == c.view
    assert isinstance(offer(c, ready("q", revision=4), 1.0), NotMember)


def test_coordinator_adopts_a_newer_view_it_missed() -> None:
    c = core("a", revision=2)
    newer = ("a", "b", "c")
    out = offer(c, ready("b", revision=3, members=newer), 1.0)
    assert c.view == Decision(3, newer)
    assert out == Pending(3)


def test_no_view_means_retry() -> None:
    assert isinstance(Membership("a", T).offer(ready("b"), 0.0), Retry)


def test_joiners_only_at_explicit_boundaries() -> None:
    for admit, want in ((True, {"a", "b", "x"}), (False, {"a", "b"})):
        c = core("a", members=("a", "b"))
        c.join_request("x", 0.5)
        heard = frozenset({"x"})
        offer(c, ready("b", members=("a", "b"), admit=admit, joiners=heard), 1.0)
        d = offer(c, ready("a", members=("a", "b"), admit=admit, joiners=heard), 1.0)
        assert isinstance(d, Decision) and set(d.members) == want


def test_joiner_waits_while_a_member_has_not_heard_from_it() -> None:
    c = core("a", members=("a", "b", "c"))
    c.join_request("x", 0.5)
    for p, heard in (("b", {"x"}), ("c", set()), ("a", {"x"})):
        d = offer(c, ready(p, members=("a", "b", "c"), joiners=frozenset(heard)), 1.0)
    assert isinstance(d, Decision) and set(d.members) == {"a", "b", "c"}
    view = d.members
    c.join_request("x", 1.5)  # still asking; now c hears it too
    for p in ("b", "c", "a"):
        d = offer(c, ready(p, revision=1, members=view, joiners=frozenset({"x"})), 2.0)
    assert isinstance(d, Decision) and set(d.members) == {"a", "b", "c", "x"}


def test_coordinator_counts_a_joiner_it_heard_after_its_own_ready() -> None:
    """A joiner asking at the very boundary: the coordinator's ready went out
    before its request came, but the coordinator decides on what it knows
    when it decides. Another member's stale word still holds it back."""
    for b_heard, want in (({"x"}, {"a", "b", "x"}), (set(), {"a", "b"})):
        c = core("a", members=("a", "b"))
        offer(c, ready("a", members=("a", "b"), joiners=frozenset()), 1.0)
        c.join_request("x", 1.2)  # says it reaches no one yet
        d = offer(c, ready("b", members=("a", "b"), joiners=frozenset(b_heard)), 1.5)
        assert isinstance(d, Decision) and set(d.members) == want, (b_heard, d)


def test_joiners_that_cannot_reach_each_other_come_one_at_a_time() -> None:
    c = core("a", members=("a", "b"))
    c.join_request("y", 0.5, frozenset({"a", "b"}))
    c.join_request("x", 0.5, frozenset({"a", "b"}))
    heard = frozenset({"x", "y"})
    offer(c, ready("b", members=("a", "b"), joiners=heard), 1.0)
    d = offer(c, ready("a", members=("a", "b"), joiners=heard), 1.0)
    assert isinstance(d, Decision) and set(d.members) == {"a", "b", "x"}
    # Next boundary: x, now a member, has not heard y, so y waits still.
    view = d.members
    c.join_request("y", 1.5, frozenset({"a", "b"}))
    for p in ("b", "x", "a"):
        d = offer(c, ready(p, revision=1, members=view,
                          joiners=frozenset() if p == "x" else frozenset({"y"})), 2.0)
    assert isinstance(d, Decision) and set(d.members) == {"a", "b", "x"}, d


def test_a_joiners_request_keeps_its_process_across_views() -> None:
    """The process that asked last is what a view admitting the joiner names;
    a view installed meanwhile does not lose it, admitting it does."""
    c = core("a", members=("a", "b"))
    assert c.joiner_incarnation("x") == 0
    c.join_request("x", 0.5, incarnation=7)
    c.join_request("x", 0.6, incarnation=9)  # restarted while asking
    offer(c, ready("b", members=("a", "b"), joiners=frozenset()), 1.0)
    d = offer(c, ready("a", members=("a", "b"), joiners=frozenset()), 1.0)
    assert isinstance(d, Decision) and c.view == d and "x" not in d.members
    assert c.joiner_incarnation("x") == 9
    c.install(Decision(d.revision + 1, ("a", "b", "x")), 2.0)
    assert c.joiner_incarnation("x") == 0  # a member now: the view says


def test_stale_joiner_is_not_admitted() -> None:
    c = core("a", members=("a", "b"))
    c.join_request("x", 0.0)
    assert c.joiners(5.0) == {"x"}
    assert c.joiners(5.5) == frozenset()
    heard = frozenset({"x"})  # the members heard it too, but it has gone quiet
    offer(c, ready("b", members=("a", "b"), joiners=heard), 6.0)
    d = offer(c, ready("a", members=("a", "b"), joiners=heard), 6.0)
    assert isinstance(d, Decision) and set(d.members) == {"a", "b"}


def test_liveness_expiry_and_suspicion() -> None:
    c = core("a")
    c.heard("b", 3.0)
    c.heard("c", 4.0)
    assert c.expired(5.0) == frozenset()
    assert c.expired(8.5) == {"b", "d"}  # d never heard: its grace began at install
    assert c.suspect({"b", "a", "zz"}) == {"b"}  # never self, never a non-member
    assert c.expired(8.5) == {"d"}
    assert c.suspect({"b"}) == frozenset()
    c.install(Decision(1, ("a", "c", "d")), 9.0)
    assert c.suspects == set()


def test_a_reported_loss_is_taken_up_only_while_a_quorum_remains() -> None:
    """What another member lost says that it cannot reach them, not that this
    peer cannot: a reported loss that would leave this peer without a quorum
    is not taken up. What this peer found itself always is."""
    c = core("b")
    assert c.suspect({"d"}) == {"d"}  # b cannot reach d
    assert c.suspect({"a"}, observed=False) == frozenset()  # c lost a: a, b of 4 would be no quorum
    assert c.suspects == {"d"} and c.coordinator() == "a"
    five = core("a", members=("a", "b", "c", "d", "e"))
    assert five.suspect({"e", "d", "c"}, observed=False) == {"c", "d"}  # e is one too many
    assert five.suspect({"e"}) == {"e"} and five.observed == {"e"}
    assert five.suspects == {"c", "e"}  # what it found outweighs d, reported earlier


def test_a_loss_found_later_outweighs_one_reported_earlier() -> None:
    """Links a-c and b-d cut: c reports a lost while b still has a quorum
    without it; b then finds d gone itself. b must go back to its
    coordinator a, which it reaches, rather than stay without a quorum."""
    c = core("b")
    assert c.suspect({"a"}, observed=False) == {"a"}
    assert c.coordinator() == "b"
    assert c.suspect({"d"}) == {"d"}
    assert c.suspects == {"d"} and c.coordinator() == "a"
    c.install(Decision(1, ("a", "b")), 2.0)
    assert c.suspects == set() and c.observed == set()


def test_a_report_not_taken_up_is_forgotten_with_the_view_that_settled_it() -> None:
    c = core("a")
    c.suspect({"c"})
    assert c.suspect({"d", "b"}, observed=False) == {"b"}  # d too would leave no quorum
    assert c.suspect({"d"}) == {"d"} and c.suspects == {"c", "d"}  # b outweighed
    c.install(Decision(1, ("a", "b")), 2.0)  # b is in: the report of b is settled
    assert c.suspects == set() and c.coordinator() == "a"


def test_install_ignores_older_views() -> None:
    c = core("a", revision=3)
    assert not c.install(Decision(3, ("a",)), 1.0)
    assert not c.install(Decision(2, ("a",)), 1.0)
    assert c.install(Decision(4, ("a", "b")), 1.0)
    assert c.is_member and c.others() == ("b",)


def test_install_refuses_a_view_of_an_earlier_process_of_this_peer() -> None:
    """A view that counts on another process of this peer's id (the one before
    a crash and restart) is not this process's to install: it has none of
    that one's round state. One that names this process, or does not know, is."""
    c = Membership("b", T, incarnation=7)
    assert not c.install(Decision(1, ("a", "b"), (3, 6)), 0.0)
    assert c.view is None
    assert c.install(Decision(1, ("a", "b"), (3, 7)), 0.0)
    assert c.install(Decision(2, ("a", "b"), (3, 0)), 0.0)
    assert c.install(Decision(3, ("a", "b")), 0.0) and c.is_member


def test_incarnations_take_the_installed_views_word() -> None:
    """A view's incarnations replace what was heard (which may be stale or
    newer: a later message tells); a member the view does not know keeps
    what was heard only when this peer was in the view before (``fresh``
    False), and peers outside the view are forgotten."""
    t = Incarnations()
    for peer, inc in (("a", 1), ("b", 2), ("c", 3), ("x", 9)):
        t.restarted(peer, inc)
    t.adopt(Decision(5, ("a", "b", "c"), (1, 20, 0)), fresh=False)
    assert (t.of("a"), t.of("b"), t.of("c"), t.of("x")) == (1, 20, 3, 0)
    assert not t.restarted("b", 20) and t.restarted("b", 2)
    t.adopt(Decision(8, ("a", "b", "c"), (1, 2, 0)), fresh=True)
    assert (t.of("a"), t.of("b"), t.of("c")) == (1, 2, 0)
    assert not t.restarted("c", 30)  # nothing stale to compare with
    t.adopt(Decision(9, ("a", "c")), fresh=False)
    assert (t.of("a"), t.of("b"), t.of("c")) == (1, 0, 30)


def test_a_views_incarnation_of_a_member() -> None:
    d = Decision(1, ("b", "a"), (5, 6))
    assert (d.incarnation_of("a"), d.incarnation_of("b"), d.incarnation_of("z")) == (6, 5, 0)
    assert Decision(1, ("a",)).incarnation_of("a") == 0


@pytest.mark.parametrize("dead", [set(), {"a"}, {"a", "b"}, {"c"}, {"b", "d"}])
def test_survivors_converge_on_one_view(dead: set[str]) -> None:
    """Simulate the ready protocol among cores: survivors end in the same view."""
    cores = {p: core(p) for p in MEMBERS if p not in dead}
    for c in cores.values():
        c.suspect(dead)
    pending: dict[str, int] = {}
    for p, c in cores.items():
        coord = c.coordinator()
        assert coord is not None and coord in cores
        out = offer(cores[coord], ready(p, suspects=frozenset(c.suspects)), 1.0)
        if isinstance(out, Pending):
            pending[p] = out.revision
        else:
            assert isinstance(out, Decision)
            c.install(out, 1.0)
    coord = min(cores)
    if not has_quorum(MEMBERS, cores):
        # A minority (here the half without the lowest id) never decides a view.
        assert all(cores[coord].answer(p, after) is None for p, after in pending.items())
        assert all(c.view is not None and c.view.revision == 0 for c in cores.values())
        return
    for p, after in pending.items():
        ans = cores[coord].answer(p, after)
        assert isinstance(ans, Decision)
        cores[p].install(ans, 1.0)
    views = {c.view for c in cores.values()}
    assert len(views) == 1
    (v,) = views
    assert v is not None and v.revision == 1 and sorted(v.members) == sorted(cores)
