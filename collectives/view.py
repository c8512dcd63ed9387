"""Round-view agreement: pure decisions (no I/O, no clock reads).

There is no fixed master. The coordinator of the next revision is the lowest
peer id among the current view's members not suspected of being gone; when it
fails, survivors suspect it and the next lowest takes over. Members at a round
boundary send the coordinator a ``Ready``; it decides once every member it
expects is ready, or at the deadline without the missing ones. What it
decides is a proposal: it becomes the next view once a quorum of the
current members accepted it (``collectives.ballot``), so that coordinators
who believe differently about who is gone never install two views of one
revision. Joiners are
admitted only when every ready member allows it (explicit boundaries, not
failure retries, because a joiner is not running the interrupted operation),
and only joiners that reach every ready member and each other: a peer that
cannot reach another of the view would fail every round.

Partitions: only the side holding a quorum of the view goes on. The other
side keeps probing the members it lost (``probe_targets``); once one of them
answers with a newer revision, the peer is ``stranded`` and rejoins the run
as a joiner at the next round boundary. A loss that another member reports
counts only while the members left make a quorum
(``Membership.suspect``): it says who cannot reach whom, and taking up
every such report of a partial partition can leave no side with a quorum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from collectives.topology import LinkEstimate, order_ring


@dataclass(frozen=True)
class Ready:
    """One member's readiness for the next view, with what it knows."""

    peer: str
    revision: int
    members: tuple[str, ...]
    suspects: frozenset[str] = frozenset()
    admit: bool = True
    links: Mapping[str, LinkEstimate] = field(default_factory=dict)
    joiners: frozenset[str] = frozenset()  # joiners whose requests reached this member
    incarnations: tuple[int, ...] = ()  # of ``members``, as in ``Decision``


@dataclass(frozen=True)
class Decision:
    """A view: its revision, its members in ring order, and the process of each
    member it counts on (``collectives.incarnation``).

    A peer id names a key, not a process. The incarnations say which process
    of each id was chosen, so that a member that missed a view (stranded, or
    away when a peer restarted and was admitted again) learns the new process
    from the view itself, instead of taking its first word for a restart, and
    a restarted process is never handed its predecessor's place. 0 (or an
    empty tuple: all of them) means the chooser had not heard that member's.
    """

    revision: int
    members: tuple[str, ...]  # ring order
    incarnations: tuple[int, ...] = ()

    def incarnation_of(self, peer: str) -> int:
        """The process of ``peer`` this view counts on; 0 if not known."""
        if not self.incarnations or peer not in self.members:
            return 0
        return self.incarnations[self.members.index(peer)]


def coordinator_of(members: Iterable[str], suspects: Iterable[str] = ()) -> str | None:
    """The lowest id among members not suspected; ``None`` if all are suspected."""
    gone = set(suspects)
    alive = [m for m in members if m not in gone]
    return min(alive) if alive else None


def has_quorum(current: Iterable[str], survivors: Iterable[str]) -> bool:
    """Whether ``survivors`` may carry on from the view ``current``: a strict
    majority of its members, or exactly half including its lowest id. Two
    sides of a partition can never both qualify, so the minority never forms
    a view of its own (no split brain); a lone survivor of a pair continues
    only if it holds the lower id.
    """
    members = set(current)
    kept = members & set(survivors)
    if 2 * len(kept) > len(members):
        return True
    return 2 * len(kept) == len(members) and bool(members) and min(members) in kept


def probe_targets(members: Iterable[str], me: str, suspects: Iterable[str]) -> frozenset[str]:
    """Suspected members to keep heartbeating from ``me``'s side of a partition.

    None while the members ``me`` still reaches are a quorum of the view: that
    side re-forms without the suspects, who come back as joiners. Without a
    quorum, all of them: this side cannot form a view of its own, and a
    suspect that answers again is how it learns the partition has healed.
    """
    current = set(members)
    gone = (set(suspects) & current) - {me}
    if me not in current or has_quorum(current, current - gone):
        return frozenset()
    return frozenset(gone)


def stranded(
    members: Iterable[str], me: str, suspects: Iterable[str], newer: Iterable[str]
) -> bool:
    """Whether ``me`` has lost its place in the run and must rejoin as a joiner.

    True when the members ``me`` reaches are no quorum of its view and some
    member of that view (``newer``: members that reported a higher revision)
    has moved on: the side that held the quorum agreed a newer view, which
    only admits this peer at a round boundary. Its old view is then dead;
    acting on it could never succeed and must never form a view.
    """
    current = set(members)
    if me not in current:
        return False
    gone = (set(suspects) & current) - {me}
    moved_on = (set(newer) & current) - {me}
    return bool(moved_on) and not has_quorum(current, current - gone)


def link_matrix(readies: Mapping[str, Ready]) -> dict[tuple[str, str], LinkEstimate]:
    """Directed link estimates ``(reporter, peer)`` gathered from all readies."""
    return {(r.peer, p): est for r in readies.values() for p, est in r.links.items()}


def decide_view(
    revision: int,
    members: Iterable[str],
    readies: Mapping[str, Ready],
    suspects: Iterable[str],
    joiners: Mapping[str, Iterable[str]],
    deadline_passed: bool,
) -> Decision | None:
    """The next view, or ``None`` while it is too early to decide.

    Members in the next view: current members that are ready and not
    suspected, plus ``joiners`` (each with the peers it reaches) that reach
    every ready member (the member heard the joiner, or the joiner says it
    reaches the member) and each other, when every ready member admits
    joiners; never without a quorum of the current members
    (``has_quorum``). Ready peers that are not current members are
    ignored. Nothing is decided while an expected member (not suspected) is
    missing, until the deadline passes.
    """
    current = set(members)
    gone = set(suspects)
    expected = current - gone
    ready = set(readies) & current
    if not deadline_passed and not expected <= ready:
        return None
    chosen = ready & expected
    if not chosen or not has_quorum(current, chosen):
        return None
    if all(readies[p].admit for p in ready):
        # Each member needs a working session with a joiner (heartbeats, and
        # data links where the ring puts them side by side). Either side's word
        # shows one: the member heard the joiner's request, or the joiner holds
        # a session with the member that answered its last request. Where
        # neither does, the joiner waits for a boundary where every member can.
        # (The members' word alone would miss a joiner whose first request is
        # still on its way when a member sends its ready, as when a stranded
        # peer asks at the very boundary the others hold.)
        reachable = {j for j in set(joiners) - gone
                     if all(j in readies[p].joiners or p in joiners[j] for p in ready)}
        # Joiners need sessions with each other too: lowest id first, each one
        # that reaches all those taken so far (a session either side holds).
        taken: list[str] = []
        for j in sorted(reachable):
            if all(a in joiners[j] or j in joiners[a] for a in taken):
                taken.append(j)
        chosen |= set(taken)
    relevant = {p: r for p, r in readies.items() if p in ready}
    return Decision(revision + 1, order_ring(chosen, link_matrix(relevant)))


def initial_view(members: Iterable[str]) -> Decision:
    """Revision 0, agreed without messages by peers started with the same member list."""
    return Decision(0, order_ring(members, {}))
