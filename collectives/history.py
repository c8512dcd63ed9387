"""Commit histories: where each member last completed a collective of a tag,
compared before one member uses another's data.

Members of a view complete the same collectives of a tag in the same order,
so their last completions agree. A split breaks that: a status exchange
cannot settle every case (a peer may suspect another just before that one's
failure report arrives), so one peer can complete a round that the others
retry on a new view. Its next call would then meet their retry under the
same keys, and two rounds' data would be combined as one. Comparing marks
first turns that into a clean failure: the members' marks decide who is
out of line, and that peer leaves and rejoins with a fresh history.

A peer that joined (or rejoined) since has no history to compare; the run's
first members share an empty one.
"""

from __future__ import annotations

from typing import Protocol

from peerd.errors import PeerLost

NO_HISTORY = b"-"  # joined (or rejoined) since the tag's last completion
FIRST_MEMBERS = b"first"  # one of the run's first members, before its first completion


def mark(revision: int, seq: int) -> bytes:
    """The history mark of the collective with sequence ``seq`` in ``revision``."""
    return b"%d.%d" % (revision, seq)


def diverged(mine: bytes, theirs: bytes) -> bool:
    """Whether two members' marks show that one completed what the other did not."""
    return mine != theirs and NO_HISTORY not in (mine, theirs)


def odd_histories(marks: dict[str, bytes]) -> set[str]:
    """The members whose mark differs from the most common one (ties: the
    larger mark stands). Every member that sees the same marks blames the
    same peers; members without a history are never blamed."""
    counts: dict[bytes, int] = {}
    for m in marks.values():
        if m != NO_HISTORY:
            counts[m] = counts.get(m, 0) + 1
    if not counts:
        return set()
    common = max(counts, key=lambda m: (counts[m], m))
    return {p for p, m in marks.items() if m not in (NO_HISTORY, common)}


class Diverged(PeerLost):
    """This peer's history differs from the other members': its state went one
    way while theirs went another, so it must leave and rejoin (and resync)
    before it contributes again."""


class Joins(Protocol):
    """What a history needs of the membership driver."""

    joins: int  # how often this peer asked to be (re)admitted
    history_base: bytes  # FIRST_MEMBERS, or NO_HISTORY once it joined


class Histories:
    """One member's marks, per operation key; forgotten whenever it (re)joins."""

    def __init__(self, driver: Joins) -> None:
        self._driver = driver
        self._joins = driver.joins
        self._marks: dict[object, bytes] = {}

    def of(self, key: object) -> bytes:
        if self._driver.joins != self._joins:
            self._marks.clear()
            self._joins = self._driver.joins
        return self._marks.get(key, self._driver.history_base)

    def record(self, key: object, revision: int, seq: int) -> None:
        self.of(key)  # forget marks from before a rejoin first
        self._marks[key] = mark(revision, seq)
