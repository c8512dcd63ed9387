"""Ring order from measured pairwise links (pure).

All-reduce time on a ring is set by its slowest hop, so the order maximises
the bottleneck bandwidth: a greedy nearest-neighbour tour (always step to the
unvisited peer with the fastest link, then the lowest latency, then the lowest
id) is built from every starting peer, improved by 2-opt segment reversals
(the greedy tour's closing hop is often slow), and the tour with the best
(hop bandwidths slowest first, -total latency) wins, the id-sorted ring
included. Ties and missing measurements resolve by peer id, so every peer
computing this from the same data gets the same ring; with no measurements at
all the ring is sorted by id.

The ordering compares links by class, not by raw reading: bandwidth rounded
down to a power of two, latency to whole milliseconds. Probes of identical
links differ by far more than a ring could gain from them (four peers on one
bridge read 34 MB/s to over 1 GB/s for the same veth links), and ordering by
that noise reshuffled the ring at every view and let two coordinators of one
revision could pick different rings from their own readings. Equal links now tie
and resolve by id; the price is that a ring may be up to 2x slower at its
bottleneck than the best, in exchange for the same ring everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

UNKNOWN_BANDWIDTH = 0.0  # an unmeasured link is assumed to be the worst
UNKNOWN_LATENCY = 0.0  # ... but its latency is not held against it
# Links measured faster than this (~1 Gbit/s) are one class: a 1 MiB probe takes
# under 8 ms on them, the order of the round trip its timing is corrected by.
FAST_CLASS = float(2**27)
SLOW_LATENCY = 60.0  # seconds; any latency above is one class (and a huge report cannot overflow)
TWO_OPT_MAX_PEERS = 32  # above this the greedy tours are used as they are (cost)
TWO_OPT_PASSES = 8


@dataclass(frozen=True)
class LinkEstimate:
    """One direction of one link: bytes/second and one-way latency in seconds."""

    bandwidth: float
    latency: float


Links = Mapping[tuple[str, str], LinkEstimate]


def edge(links: Links, a: str, b: str) -> LinkEstimate:
    """Symmetric estimate of the a-b link: the slower and laggier of both directions."""
    known = [e for e in (links.get((a, b)), links.get((b, a))) if e is not None]
    if not known:
        return LinkEstimate(UNKNOWN_BANDWIDTH, UNKNOWN_LATENCY)
    return LinkEstimate(min(e.bandwidth for e in known), max(e.latency for e in known))


def link_class(links: Links, a: str, b: str) -> tuple[float, int]:
    """What the ordering compares for the a-b link: its bandwidth rounded down to
    a power of two in bytes/s (0 if unmeasured, at most ``FAST_CLASS``) and its
    latency in whole ms (at most ``SLOW_LATENCY``)."""
    e = edge(links, a, b)
    bandwidth = 2.0 ** math.floor(math.log2(e.bandwidth)) if e.bandwidth >= 1 else 0.0
    return min(bandwidth, FAST_CLASS), math.floor(min(e.latency, SLOW_LATENCY) * 1000)


def bottleneck(ring: tuple[str, ...], links: Links) -> float:
    """The slowest hop's bandwidth, closing edge included (inf for one peer)."""
    if len(ring) < 2:
        return float("inf")
    return min(edge(links, ring[i], ring[(i + 1) % len(ring)]).bandwidth for i in range(len(ring)))


def canonical(ring: tuple[str, ...]) -> tuple[str, ...]:
    """Rotate so the lowest id leads, and orient so the smaller neighbour follows it."""
    if len(ring) < 3:
        return tuple(sorted(ring))
    i = ring.index(min(ring))
    rotated = ring[i:] + ring[:i]
    reverse = (rotated[0], *reversed(rotated[1:]))
    return min(rotated, reverse)


# Link classes of every ordered pair, worked out once per ``order_ring``: the
# tours below look each hop up thousands of times (2-opt rescoring).
Classes = dict[tuple[str, str], tuple[float, int]]


def _greedy(start: str, members: list[str], cls: Classes) -> tuple[str, ...]:
    tour = [start]
    left = [m for m in members if m != start]  # kept sorted: max() keeps the lowest id on ties
    while left:
        here = tour[-1]
        nxt = max(left, key=lambda m: _fastest_then_nearest(cls[here, m]))
        tour.append(nxt)
        left.remove(nxt)
    return tuple(tour)


def _fastest_then_nearest(c: tuple[float, int]) -> tuple[float, int]:
    return c[0], -c[1]


def _score(tour: tuple[str, ...], cls: Classes) -> tuple[tuple[float, ...], int]:
    """Larger is better: hop bandwidth classes slowest first (max-min), then low
    total latency class."""
    hops = [cls[tour[i - 1], tour[i]] for i in range(len(tour))]
    return tuple(sorted(h[0] for h in hops)), -sum(h[1] for h in hops)


def _two_opt(tour: tuple[str, ...], cls: Classes) -> tuple[str, ...]:
    """Reverse segments while that improves the score (bounded passes).

    Classes are symmetric, so reversing ``tour[i..j]`` changes only the two
    hops at its ends, and whether it improves the score follows from those
    four hops alone (``_better``): O(1) per candidate instead of rescoring
    the whole tour (a 32-peer view took 0.93 s of the event loop that way).
    """
    best = list(tour)
    n = len(best)
    for _ in range(TWO_OPT_PASSES):
        improved = False
        for i in range(1, n - 1):
            for j in range(i + 1, n):
                a, b, c, d = best[i - 1], best[i], best[j], best[(j + 1) % n]
                if _better((cls[a, b], cls[c, d]), (cls[a, c], cls[b, d])):
                    best[i : j + 1] = best[i : j + 1][::-1]
                    improved = True
        if not improved:
            break
    return tuple(best)


def _better(gone: tuple[tuple[float, int], ...], new: tuple[tuple[float, int], ...]) -> bool:
    """Whether a tour whose hops ``gone`` are replaced by ``new`` scores higher
    (``_score``). Its sorted bandwidth classes differ from the current ones
    only in these values; the first position where two sorted sequences of
    one length differ holds the smallest value whose count differs, and the
    sequence with fewer of it is the larger. Equal sequences leave latency."""
    delta: dict[float, int] = {}
    for h in gone:
        delta[h[0]] = delta.get(h[0], 0) - 1
    for h in new:
        delta[h[0]] = delta.get(h[0], 0) + 1
    changed = [v for v, k in delta.items() if k]
    if changed:
        return delta[min(changed)] < 0
    return sum(h[1] for h in new) < sum(h[1] for h in gone)


def order_ring(members: Iterable[str], links: Links) -> tuple[str, ...]:
    """A ring over ``members`` (duplicates removed) that maximises the bottleneck link."""
    peers = sorted(set(members))
    if len(peers) < 3:
        return tuple(peers)
    best: tuple[str, ...] | None = None
    best_key: tuple[tuple[float, ...], int] | None = None
    cls = {(a, b): link_class(links, a, b) for a in peers for b in peers if a != b}
    # The id-sorted ring is a candidate too, so measurements never make it worse
    # (by class).
    tours = [tuple(peers)] + [_greedy(s, peers, cls) for s in peers]
    if len(peers) <= TWO_OPT_MAX_PEERS:
        tours = [_two_opt(t, cls) for t in tours]
    for tour in map(canonical, tours):
        key = _score(tour, cls)
        if (
            best_key is None
            or key > best_key
            or (key == best_key and best is not None and tour < best)
        ):
            best, best_key = tour, key
    assert best is not None
    return best
