"""How a flat tensor of N elements is cut into R ring chunks and sub-chunks.

Pure arithmetic; every peer computes the same boundaries from (N, R, sub size).
Chunks are contiguous and as equal as possible: the first ``N % R`` chunks get
one element more. With fewer elements than peers some chunks are empty, and an
empty chunk has no sub-chunks (nothing is sent for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Elements ``[lo, hi)`` of the flat tensor."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"bad span [{self.lo}, {self.hi})")

    @property
    def size(self) -> int:
        return self.hi - self.lo


def chunk_spans(n: int, parts: int) -> tuple[Span, ...]:
    """Split ``n`` elements into ``parts`` contiguous spans covering ``[0, n)``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if parts < 1:
        raise ValueError("parts must be >= 1")
    base, extra = divmod(n, parts)
    spans = []
    lo = 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        spans.append(Span(lo, hi))
        lo = hi
    return tuple(spans)


def sub_spans(chunk: Span, sub_elems: int) -> tuple[Span, ...]:
    """Cut ``chunk`` into pieces of at most ``sub_elems`` elements (pipelining unit)."""
    if sub_elems < 1:
        raise ValueError("sub_elems must be >= 1")
    return tuple(
        Span(lo, min(lo + sub_elems, chunk.hi)) for lo in range(chunk.lo, chunk.hi, sub_elems)
    )


@dataclass(frozen=True)
class Layout:
    """Where every sub-chunk of every ring chunk sits in the wire-format buffer."""

    chunks: tuple[Span, ...]
    subs: tuple[tuple[Span, ...], ...]  # per chunk
    offsets: tuple[tuple[int, ...], ...]  # byte offset of each sub-chunk's block
    sizes: tuple[tuple[int, ...], ...]  # byte size of each sub-chunk's block
    total: int

    def region(self, chunk: int, sub: int) -> slice:
        off = self.offsets[chunk][sub]
        return slice(off, off + self.sizes[chunk][sub])


def layout(n: int, parts: int, sub_elems: int, wire_size: Callable[[int], int]) -> Layout:
    """Chunks of ``n`` elements over ``parts`` peers, sub-chunks, and their wire blocks."""
    chunks = chunk_spans(n, parts)
    subs = tuple(sub_spans(c, sub_elems) for c in chunks)
    offsets: list[tuple[int, ...]] = []
    sizes: list[tuple[int, ...]] = []
    pos = 0
    for pieces in subs:
        sz = tuple(wire_size(s.size) for s in pieces)
        offs = []
        for s in sz:
            offs.append(pos)
            pos += s
        offsets.append(tuple(offs))
        sizes.append(sz)
    return Layout(chunks, subs, tuple(offsets), tuple(sizes), pos)
