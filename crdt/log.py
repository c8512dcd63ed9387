"""The delta log (sans-I/O): every accepted delta, indexed by author and seq.

Anti-entropy compares version vectors built from this log: for each author, the
highest ``seq`` up to which this replica holds every delta. Deltas that arrive
out of order are kept too (they are merged at once; CRDT joins do not care
about order) but only advance the vector when the gap before them fills.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


class DeltaLog:
    __slots__ = ("_by_author", "_contiguous", "_max", "total_bytes")

    def __init__(self) -> None:
        self._by_author: dict[bytes, dict[int, LogEntry]] = {}
        self._contiguous: dict[bytes, int] = {}
        self._max: dict[bytes, int] = {}
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
        while upto + 1 in entries:
            upto += 1
        self._contiguous[author] = upto
        return True

    def version_vector(self) -> dict[bytes, int]:
        """Per author, the highest seq below which nothing is missing."""
        return {a: n for a, n in self._contiguous.items() if n}

    def missing_for(
        self, remote: Mapping[bytes, int], max_bytes: int, order: Iterable[bytes] | None = None
    ) -> Missing:
        """Blobs the holder of ``remote`` lacks, at most ``max_bytes`` of them (but
        at least one), authors taken in ``order``, each author's in seq order."""
        out: list[bytes] = []
        upto: dict[bytes, int] = {}
        size = 0
        for author in self.authors() if order is None else order:
            entries = self._by_author.get(author)
            if not entries:
                continue
            for seq in self._seqs_after(entries, author, remote.get(author, 0)):
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


__all__ = ["DeltaLog", "LogEntry", "Missing"]
