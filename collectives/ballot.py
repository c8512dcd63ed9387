"""One view per revision: single-decree Paxos over each view change (pure).

The coordinator of a view change is whoever the members believe it is
(``collectives.view.coordinator_of``), and beliefs differ while a suspicion
spreads: a member whose ready reached the lowest id may go on to the next
lowest once it hears the first was lost, and both may then decide. Deciding
alone let two coordinators install different views of one revision, after
which the pair rule of ``has_quorum`` (a lone lower id goes on) could keep
both sides training apart. So a decided view is only a proposal; it becomes
the next view once a quorum of the current view's members (the acceptors)
accepted it in one ballot, and only such a *chosen* view is ever installed.

- A ballot is ``(number, coordinator)``. The current view's lowest member,
  the coordinator when no one is suspected, opens with ballot 0 and proposes
  its own view at once: no acceptor can have accepted a lower ballot. Every
  other proposal (another coordinator, or a retry) first has a quorum promise
  a higher ballot and proposes the view accepted under the highest ballot
  among their answers, its own only where none accepted any.
- An acceptor promises a ballot above every one it promised before, and
  accepts a proposal unless it promised a higher ballot.

Any two quorums of a view share a member (``has_quorum``), so once a view is
chosen every later ballot proposes that same view: at most one view per
revision, whatever coordinators believe, fail or duel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from collectives.view import Decision, has_quorum


@dataclass(frozen=True, order=True)
class Ballot:
    number: int
    coordinator: str


@dataclass(frozen=True)
class Vote:
    """An acceptor's answer to a prepare or an accept: ``ok``, the highest
    ballot it has promised (a refusal names the ballot that beat the
    proposer's) and the proposal it accepted last, if any."""

    ok: bool
    promised: Ballot | None
    accepted: tuple[Ballot, Decision] | None


class Acceptor:
    """One member's votes in the choice of one view (the one after its base)."""

    def __init__(self) -> None:
        self.promised: Ballot | None = None
        self.accepted: tuple[Ballot, Decision] | None = None

    def prepare(self, ballot: Ballot) -> Vote:
        """Promise ``ballot`` if it is above every ballot promised so far."""
        if self.promised is not None and ballot <= self.promised:
            return Vote(False, self.promised, self.accepted)
        self.promised = ballot
        return Vote(True, ballot, self.accepted)

    def accept(self, ballot: Ballot, decision: Decision) -> Vote:
        """Accept ``decision`` under ``ballot`` unless a higher ballot was promised."""
        if self.promised is not None and ballot < self.promised:
            return Vote(False, self.promised, self.accepted)
        self.promised = ballot
        self.accepted = (ballot, decision)
        return Vote(True, ballot, self.accepted)


class Proposer:
    """One member's ballots in the choice of one view."""

    def __init__(self, me: str, members: Iterable[str]) -> None:
        self.me = me
        self._opens = me == min(members)  # may use ballot 0 (see the module doc)
        self._highest = -1  # the highest ballot number used or seen

    def next_ballot(self) -> Ballot:
        """A ballot no one used before: 0 for the first proposal of the view's
        lowest member, else above every number used or seen."""
        number = 0 if self._opens and self._highest < 0 else max(self._highest + 1, 1)
        self._highest = number
        return Ballot(number, self.me)

    def saw(self, vote: Vote) -> None:
        """Note a refusal's ballot, so that the next one goes above it."""
        if vote.promised is not None:
            self._highest = max(self._highest, vote.promised.number)


def adopt(own: Decision, promises: Iterable[Vote]) -> Decision:
    """What a prepared ballot proposes: the view accepted under the highest
    ballot among the promises, else ``own``."""
    accepted = [v.accepted for v in promises if v.ok and v.accepted is not None]
    if not accepted:
        return own
    return max(accepted, key=lambda a: a[0])[1]


def settled(members: Iterable[str], voters: Iterable[str]) -> bool:
    """Whether the acceptors in ``voters`` (members of the current view that
    voted yes) are enough: a quorum of the view's ``members``."""
    return has_quorum(members, voters)
