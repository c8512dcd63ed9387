"""The delta log (sans-I/O): every accepted delta, indexed by author and seq.

Anti-entropy compares version vectors built from this log: for each author, the
highest ``seq`` up to which this replica holds every delta. Deltas that arrive
out of order are kept too (they are merged at once; CRDT joins do not care
about order) but only advance the vector when the gap before them fills; until
then they are reported as "held ranges" so peers do not send them again.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LogEntry:
    digest: bytes
    blob: bytes


@dataclass(frozen=True)
class Missing:
    """One chunk of what a peer lacks; ``upto`` is the last seq sent per author,
    so ``remote | upto`` asks for the next chunk."""

    blobs: list[bytes]
    more: bool
    upto: dict[bytes, int]


Held = dict[bytes, list[tuple[int, int]]]


def _to_ranges(seqs: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for seq in seqs:
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def _covered(seq: int, ranges: Sequence[tuple[int, int]]) -> bool:
    i = bisect.bisect_right(ranges, (seq, 2**64)) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


class DeltaLog:
    __slots__ = ("_by_author", "_contiguous", "_extra", "_max", "total_bytes")

    def __init__(self) -> None:
        self._by_author: dict[bytes, dict[int, LogEntry]] = {}
        self._contiguous: dict[bytes, int] = {}
        self._max: dict[bytes, int] = {}
        self._extra: dict[bytes, set[int]] = {}  # held seqs above the contiguous prefix
        self.total_bytes = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_author.values())

    def authors(self) -> list[bytes]:
        return sorted(self._by_author)

    def get(self, author: bytes, seq: int) -> LogEntry | None:
        return self._by_author.get(author, {}).get(seq)

    def max_seq(self, author: bytes) -> int:
        return self._max.get(author, 0)

    def add(self, author: bytes, seq: int, digest: bytes, blob: bytes) -> bool:
        """Record a delta; False if this (author, seq) is already held."""
        entries = self._by_author.setdefault(author, {})
        if seq in entries:
            return False
        entries[seq] = LogEntry(digest, blob)
        self.total_bytes += len(blob)
        self._max[author] = max(self._max.get(author, 0), seq)
        upto = self._contiguous.get(author, 0)
        extra = self._extra.setdefault(author, set())
        if seq != upto + 1:
            extra.add(seq)
            return True
        upto = seq
        while upto + 1 in extra:
            upto += 1
            extra.discard(upto)
        self._contiguous[author] = upto
        return True

    def version_vector(self) -> dict[bytes, int]:
        """Per author, the highest seq below which nothing is missing."""
        return {a: n for a, n in self._contiguous.items() if n}

    def held_ranges(self, limit: int) -> Held:
        """Per author, the seqs held above the contiguous prefix as inclusive ranges
        (at most ``limit`` ranges in all; leaving some out only causes resends)."""
        out: Held = {}
        budget = limit
        for author in sorted(self._extra):
            if budget <= 0:
                break
            ranges = _to_ranges(sorted(self._extra[author]))[:budget]
            if ranges:
                out[author] = ranges
                budget -= len(ranges)
        return out

    def missing_for(
        self,
        remote: Mapping[bytes, int],
        max_bytes: int,
        order: Iterable[bytes] | None = None,
        held: Held | None = None,
    ) -> Missing:
        """Blobs the holder of ``remote`` (and of the ``held`` ranges) lacks, at most
        ``max_bytes`` of them (but at least one), authors taken in ``order``, each
        author's in seq order."""
        out: list[bytes] = []
        upto: dict[bytes, int] = {}
        size = 0
        for author in self.authors() if order is None else order:
            entries = self._by_author.get(author)
            if not entries:
                continue
            ranges = held.get(author, ()) if held else ()
            for seq in self._seqs_after(entries, author, remote.get(author, 0)):
                if ranges and _covered(seq, ranges):
                    continue
                entry = entries[seq]
                if out and size + len(entry.blob) > max_bytes:
                    return Missing(out, True, upto)
                out.append(entry.blob)
                upto[author] = seq
                size += len(entry.blob)
        return Missing(out, False, upto)

    def _seqs_after(self, entries: dict[int, LogEntry], author: bytes, after: int) -> list[int]:
        # Walking the range is cheap when the log is dense; a sparse log (e.g. one
        # delta with a huge seq from a hostile member) must not cost a huge walk.
        top = self._max[author]
        if top - after <= 4 * len(entries):
            return [s for s in range(after + 1, top + 1) if s in entries]
        return sorted(s for s in entries if s > after)

    def lacks_from(self, remote: Mapping[bytes, int]) -> bool:
        """True when ``remote`` claims deltas this log does not hold."""
        return any(n > self._contiguous.get(a, 0) for a, n in remote.items())

    def blobs_of(self, author: bytes, after: int) -> list[bytes]:
        entries = self._by_author.get(author, {})
        return [entries[s].blob for s in sorted(entries) if s > after]


__all__ = ["DeltaLog", "Held", "LogEntry", "Missing"]
