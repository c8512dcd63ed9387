"""Per-run membership state machine (sans-I/O).

Holds the installed view, who is suspected of being gone, when each peer was
last heard from, pending joiners, and, when this peer coordinates, the readies
collected for the next view, and this peer's votes and ballots in choosing
it (``collectives.ballot``). Every method takes ``now``; the trio driver in
``collectives.driver`` owns timers and messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from collectives.ballot import Acceptor, Ballot, Proposer, Vote
from collectives.view import (
    Decision,
    Ready,
    coordinator_of,
    decide_view,
    has_quorum,
    probe_targets,
    stranded,
)

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats to each member
HEARTBEAT_TIMEOUT = 5.0  # silence after which a member is considered gone
VIEW_TIMEOUT = 60.0  # how long a coordinator waits for all members to be ready


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    view_timeout: float = VIEW_TIMEOUT


@dataclass(frozen=True)
class Pending:
    """Ready recorded; the answer comes when the view passes ``revision``."""

    revision: int


@dataclass(frozen=True)
class NotMember:
    detail: str


@dataclass(frozen=True)
class Retry:
    detail: str


Outcome = Decision | Pending | NotMember | Retry


class Membership:
    def __init__(self, me: str, timing: Timing = Timing(), incarnation: int = 0) -> None:
        self.me = me
        self.incarnation = incarnation  # this process (``collectives.incarnation``)
        self.timing = timing
        self.view: Decision | None = None
        self.suspects: set[str] = set()
        # The suspects this peer found gone itself (silence, a broken connection,
        # a failed transfer), as against those others reported: only what a peer
        # observed says that it cannot reach someone (``MembershipDriver._on_abort``).
        self.observed: set[str] = set()
        # Losses other members reported, in the order they came; which of them
        # count is weighed again whenever this peer finds one itself (``_settle``).
        self._reported: dict[str, None] = {}
        self._last_seen: dict[str, float] = {}
        # Each joiner: when its request last came, the peers it said it reaches,
        # and the process that sent it (``collectives.incarnation``).
        self._joiners: dict[str, tuple[float, frozenset[str], int]] = {}
        self._readies: dict[str, Ready] = {}
        self._round_started: float | None = None
        # Votes in the choice of the view after each base revision (this one's,
        # and the next one's for a member that has not yet heard its view was
        # chosen), and this peer's own ballots in the choice after the current.
        self._acceptors: dict[int, Acceptor] = {}
        self._proposer: Proposer | None = None
        self._newer: set[str] = set()  # members that reported a revision above ours
        self._behind = False  # see ``agreement_failed``

    # -------------------------------------------------------------- view

    def install(self, decision: Decision, now: float) -> bool:
        """Adopt a decided view if it is newer than ours; returns whether it was."""
        if self.view is not None and decision.revision <= self.view.revision:
            return False
        if decision.incarnation_of(self.me) not in (0, self.incarnation):
            # It counts on an earlier process of this peer (a crash and a
            # restart): this one has none of that process's round state, and
            # is admitted as itself once the view has dropped the other.
            return False
        outside = not self.is_member  # a joiner, or back from a lost partition
        self.view = decision
        members = set(decision.members)
        self._readies.clear()
        self._round_started = None
        self._newer.clear()
        self._behind = False
        self._proposer = None
        for base in [b for b in self._acceptors if b < decision.revision]:
            del self._acceptors[base]
        if outside:
            # Suspicions and silences from before (re)joining say nothing
            # about the members of this view: start afresh.
            self.observed.clear()
            self._reported.clear()
            self._last_seen.update(dict.fromkeys(members, now))
        self.observed &= members
        # A report not taken up was weighed against a view that has now
        # settled it: only suspicions of members that stay carry over.
        staying = members & self.suspects
        self._reported = {p: None for p in self._reported if p in staying}
        self._settle()
        for m in members - self._last_seen.keys():
            self._last_seen[m] = now  # a grace period for newcomers
        for gone in set(self._last_seen) - members - self._joiners.keys():
            del self._last_seen[gone]
        for j in members & self._joiners.keys():
            del self._joiners[j]
        return True

    @property
    def is_member(self) -> bool:
        """In the installed view and able to act on it (not ``stranded``)."""
        return self.view is not None and self.me in self.view.members and not self.stranded

    @property
    def stranded(self) -> bool:
        """On the losing side of a partition whose other side went on: this
        peer must rejoin as a joiner (see ``collectives.view.stranded``)."""
        v = self.view
        if v is None:
            return False
        return self._behind or stranded(v.members, self.me, self.suspects, self._newer)

    def speaks_for_view(self, peer: str, revision: int) -> bool:
        """Whether what ``peer`` says about revision ``revision`` (whom it suspects)
        is taken up: only from a member in good standing of this very view. A late
        message of an older view would carry suspicions into a view that already
        settled them (``install`` keeps suspicions of members that stay) and stall
        its ring; a suspect's would spread its own losses (after a flap, two
        members that each lost the other would make every third drop both)."""
        v = self.view
        return (v is not None and revision == v.revision and peer in v.members
                and peer not in self.suspects)

    def agreement_failed(self) -> bool:
        """No next view could be agreed although this side looks quorate. If a
        member reported a newer revision meanwhile, the run went on without this
        peer: after a flap, the members it still hears may all have moved on
        while none of them is suspected. Returns whether it is now stranded."""
        self._behind = self._behind or bool(self._newer)
        return self.stranded

    def reported(self, peer: str, revision: int, excluded: bool = False) -> bool:
        """A member answered with its revision (``excluded``: and a view of that
        revision without this peer); returns whether this peer is stranded as
        a result (newly or still)."""
        v = self.view
        if v is None or peer not in v.members:
            return self.stranded
        if revision > v.revision:
            self._newer.add(peer)
            if excluded and self.me in v.members:
                # A later view leaves this peer out: the run went on without it,
                # whatever quorum its own view still seems to have (the rest of
                # that view may be about to learn the same).
                self._behind = True
        elif revision == v.revision and excluded and self.me in v.members:
            # Two views of one revision. Ballots (``collectives.ballot``)
            # prevent them; before them, a member's ready could reach one
            # coordinator and then, once a cut link made it suspect that one,
            # the next, and both decided. Kept as a defence: the quorum rule
            # assumes one view per revision, so this side cannot tell whether
            # it may go on, and it rejoins the view that member holds.
            self._behind = True
        return self.stranded

    def probes(self) -> frozenset[str]:
        """Suspected members to keep heartbeating (see ``probe_targets``)."""
        v = self.view
        return probe_targets(v.members, self.me, self.suspects) if v is not None else frozenset()

    def others(self) -> tuple[str, ...]:
        return tuple(m for m in (self.view.members if self.view else ()) if m != self.me)

    # -------------------------------------------------------------- liveness

    def heard(self, peer: str, now: float) -> None:
        if peer in self._last_seen:
            self._last_seen[peer] = max(self._last_seen[peer], now)

    def suspect(self, peers: set[str] | frozenset[str], observed: bool = True) -> frozenset[str]:
        """Mark members of the view as gone, ``observed`` by this peer or reported
        by another; returns those newly suspected.

        A reported loss is taken up only while the members left still make a
        quorum: it says that the reporter cannot reach that member, not that
        this peer cannot, and giving up on members it reaches would leave this
        peer no side to be on. With two crossing cut links among four peers,
        every member took up the others' losses until none held a quorum, and
        no view formed while the cuts lasted; now each keeps those it has not
        found gone itself, and the coordinator's view drops one end of each
        cut link."""
        members = set(self.view.members) if self.view else set()
        named = (set(peers) & members) - {self.me}
        before = set(self.suspects)
        if observed:
            self.observed |= named
        else:
            self._reported.update(dict.fromkeys(sorted(named)))
        self._settle()
        return frozenset(self.suspects - before)

    def _settle(self) -> None:
        """The suspects: every member this peer found gone, then those others
        reported, in the order they came, while the members left make a
        quorum. A loss found later can so outweigh one reported earlier: with
        two crossing cut links, a report that the coordinator was lost came
        while a quorum was left, the member found its own cut link a moment
        later, and keeping the report sent its ready to no one, though it
        reached the coordinator (which waited out its view timeout, 60 s)."""
        # Both hold only members of the view other than this peer: ``suspect``
        # adds no others, and ``install`` drops those the new view leaves out.
        members = set(self.view.members) if self.view else set()
        gone = set(self.observed)
        for peer in self._reported:
            if peer not in gone and has_quorum(members, members - gone - {peer}):
                gone.add(peer)
        self.suspects = gone

    def expired(self, now: float) -> frozenset[str]:
        """Members not yet suspected that have been silent past the heartbeat timeout."""
        limit = self.timing.heartbeat_timeout
        return frozenset(
            m
            for m in self.others()
            if m not in self.suspects and now - self._last_seen.get(m, now) > limit
        )

    # -------------------------------------------------------------- joiners

    def join_request(self, peer: str, now: float, reaches: frozenset[str] = frozenset(),
                     incarnation: int = 0) -> None:
        """``peer``'s process ``incarnation`` asks to join; ``reaches``: the
        peers it says it reaches."""
        if self.view is not None and peer in self.view.members:
            return
        self._joiners[peer] = (now, reaches, incarnation)
        self._last_seen[peer] = now

    def joiners(self, now: float) -> frozenset[str]:
        """Joiners heard from within the heartbeat timeout."""
        limit = self.timing.heartbeat_timeout
        return frozenset(j for j, (t, _, _) in self._joiners.items() if now - t <= limit)

    def joiner_reach(self, now: float) -> dict[str, frozenset[str]]:
        """Each joiner heard from within the heartbeat timeout, with the peers
        it said it reaches."""
        return {j: self._joiners[j][1] for j in self.joiners(now)}

    def joiner_incarnation(self, peer: str) -> int:
        """The process whose request to join came last from ``peer``; 0 if none
        did (or it sent none). Kept with the request, so a view installed
        meanwhile, which forgets what was heard of non-members, cannot lose it."""
        entry = self._joiners.get(peer)
        return entry[2] if entry else 0

    # -------------------------------------------------------------- agreement

    def coordinator(self) -> str | None:
        return coordinator_of(self.view.members, self.suspects) if self.view else None

    def offer(self, ready: Ready, now: float) -> Outcome:
        """A member's ``Ready`` reached this peer (possibly from itself)."""
        if self.view is None:
            return Retry("no view installed yet")
        if ready.revision > self.view.revision and self.me in ready.members:
            # The sender saw a view decided while this peer missed the commit.
            self.install(Decision(ready.revision, ready.members, ready.incarnations), now)
        if self.speaks_for_view(ready.peer, ready.revision):
            self.suspect(ready.suspects - {self.me}, observed=False)
        if ready.peer not in self.view.members:
            return NotMember(f"{ready.peer} is not in revision {self.view.revision}")
        if ready.revision < self.view.revision and not self._readies:
            return self.view  # the sender missed the commit of our current view
        if self.coordinator() != self.me:
            return Retry(f"{self.me} is not the coordinator of revision {self.view.revision}")
        self._readies[ready.peer] = ready
        if self._round_started is None:
            self._round_started = now
        return Pending(self.view.revision)

    def deadline(self) -> float | None:
        if self._round_started is None:
            return None
        return self._round_started + self.timing.view_timeout

    def proposal(self, now: float) -> Decision | None:
        """What this peer, as coordinator, proposes as the next view once
        everyone expected is ready or the deadline passed (``None`` before);
        it is installed once chosen (``collectives.ballot``)."""
        if self.view is None or not self._readies:
            return None
        deadline = self.deadline()
        readies = dict(self._readies)
        own = readies.get(self.me)
        if own is not None and own.admit:
            # This peer's own word is what it knows now, not when it got ready:
            # a joiner heard since (one asking at this very boundary) counts.
            readies[self.me] = dataclasses.replace(own, joiners=own.joiners | self.joiners(now))
        decision = decide_view(
            self.view.revision,
            self.view.members,
            readies,
            self.suspects,
            self.joiner_reach(now),
            deadline is not None and now >= deadline,
        )
        return decision

    # -------------------------------------------------------------- ballots

    def ballot(self) -> Ballot:
        """This peer's next ballot in choosing the view after the current one."""
        assert self.view is not None
        if self._proposer is None:
            self._proposer = Proposer(self.me, self.view.members)
        return self._proposer.next_ballot()

    def refused(self, vote: Vote) -> None:
        """A refusal of this peer's ballot: the next one goes above its ballot."""
        if self._proposer is not None:
            self._proposer.saw(vote)

    def acceptor(self, base: int) -> Acceptor | Decision | None:
        """This peer's votes in choosing the view after revision ``base``; the
        installed view instead where it is past that choice (it was chosen,
        and this peer is a member in good standing: the proposer installs it);
        ``None`` where this peer has no say (no view, or ``base`` beyond the
        next choice it can be part of)."""
        v = self.view
        if v is None:
            return None
        if base < v.revision:
            return v if self.is_member else None
        if base > v.revision + 1:
            return None
        return self._acceptors.setdefault(base, Acceptor())

    def answer(self, peer: str, after: int) -> Decision | NotMember | None:
        """The reply to a pending ready once the view moved past ``after``."""
        if self.view is None or self.view.revision <= after:
            return None
        if peer in self.view.members:
            return self.view
        return NotMember(f"{peer} is not in revision {self.view.revision}")
