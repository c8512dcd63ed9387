"""Round-view agreement: pure decisions (no I/O, no clock reads).

There is no fixed master. The coordinator of the next revision is the lowest
peer id among the current view's members not suspected of being gone; when it
fails, survivors suspect it and the next lowest takes over. Members at a round
boundary send the coordinator a ``Ready``; it decides once every member it
expects is ready, or at the deadline without the missing ones. Joiners are
admitted only when every ready member allows it (explicit boundaries, not
failure retries, because a joiner is not running the interrupted operation).
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


@dataclass(frozen=True)
class Decision:
    revision: int
    members: tuple[str, ...]  # ring order


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


def link_matrix(readies: Mapping[str, Ready]) -> dict[tuple[str, str], LinkEstimate]:
    """Directed link estimates ``(reporter, peer)`` gathered from all readies."""
    return {(r.peer, p): est for r in readies.values() for p, est in r.links.items()}


def decide_view(
    revision: int,
    members: Iterable[str],
    readies: Mapping[str, Ready],
    suspects: Iterable[str],
    joiners: Iterable[str],
    deadline_passed: bool,
) -> Decision | None:
    """The next view, or ``None`` while it is too early to decide.

    Members in the next view: current members that are ready and not
    suspected, plus ``joiners`` when every ready member admits them; never
    without a quorum of the current members (``has_quorum``). Ready
    peers that are not current members are ignored. Nothing is decided while
    an expected member (not suspected) is missing, until the deadline passes.
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
        chosen |= set(joiners) - gone
    relevant = {p: r for p, r in readies.items() if p in ready}
    return Decision(revision + 1, order_ring(chosen, link_matrix(relevant)))


def initial_view(members: Iterable[str]) -> Decision:
    """Revision 0, agreed without messages by peers started with the same member list."""
    return Decision(0, order_ring(members, {}))
