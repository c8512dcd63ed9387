"""Telling a peer's processes apart (sans-I/O).

A peer id names a key, not a process: a volunteer whose machine crashes comes
back with the same identity but none of the old process's round state. Every
engine picks a random *incarnation* when it starts and sends it with its
heartbeats, acks and join requests; a member that hears a new incarnation for a
peer id knows the process it counted on is gone, without waiting out a
timeout, and without mistaking the new process's answers for the old one's
liveness.
"""

from __future__ import annotations

import secrets

from collectives.view import Decision

MAX_INCARNATION = 2**63 - 1


def new_incarnation() -> int:
    """A random non-zero incarnation (0 means "not sent": an older peer)."""
    return secrets.randbelow(MAX_INCARNATION) + 1


class Incarnations:
    """The latest incarnation heard from each peer id."""

    def __init__(self) -> None:
        self._latest: dict[str, int] = {}

    def restarted(self, peer: str, incarnation: int) -> bool:
        """Record ``incarnation`` for ``peer``; True if an earlier, different one was
        heard (the process this node knew is gone). 0 carries no information."""
        if incarnation == 0:
            return False
        before = self._latest.get(peer)
        self._latest[peer] = incarnation
        return before is not None and before != incarnation

    def of(self, peer: str) -> int:
        """The latest incarnation known for ``peer``; 0 if none."""
        return self._latest.get(peer, 0)

    def adopt(self, decision: Decision, fresh: bool) -> None:
        """Take the processes an installed view counts on as the latest.

        The view is trusted over what this node heard: what it heard may be
        stale (the view that dropped a restarted member, and the one that
        admitted its new process, both passed it by), or newer (the member
        restarted again since), and a later message tells which. ``fresh``: this
        node was not in the view before this one, so what it heard of members the
        view does not name says nothing about them now. The table keeps only the
        view's members.
        """
        known = decision.incarnations or (0,) * len(decision.members)
        for peer, incarnation in zip(decision.members, known, strict=True):
            if incarnation:
                self._latest[peer] = incarnation
            elif fresh:
                self._latest.pop(peer, None)
        self.forget(set(decision.members))

    def forget(self, keep: set[str] | frozenset[str]) -> None:
        """Drop peers outside ``keep``, so the table is bounded by the run's members."""
        for peer in [p for p in self._latest if p not in keep]:
            del self._latest[peer]
