"""Ring order from measured pairwise links (pure).

All-reduce time on a ring is set by its slowest hop, so the order maximises
the bottleneck bandwidth: a greedy nearest-neighbour tour (always step to the
unvisited peer with the fastest link, then the lowest latency, then the lowest
id) is built from every starting peer, and the tour with the best
(bottleneck bandwidth, -total latency) wins. Ties and missing measurements
resolve by peer id, so every peer computing this from the same data gets the
same ring; with no measurements at all the ring is sorted by id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

UNKNOWN_BANDWIDTH = 0.0  # an unmeasured link is assumed to be the worst
UNKNOWN_LATENCY = 0.0  # ... but its latency is not held against it


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


def bottleneck(ring: tuple[str, ...], links: Links) -> float:
    """The slowest hop's bandwidth, closing edge included (inf for one peer)."""
    if len(ring) < 2:
        return float("inf")
    return min(edge(links, ring[i], ring[(i + 1) % len(ring)]).bandwidth for i in range(len(ring)))


def total_latency(ring: tuple[str, ...], links: Links) -> float:
    if len(ring) < 2:
        return 0.0
    return sum(edge(links, ring[i], ring[(i + 1) % len(ring)]).latency for i in range(len(ring)))


def canonical(ring: tuple[str, ...]) -> tuple[str, ...]:
    """Rotate so the lowest id leads, and orient so the smaller neighbour follows it."""
    if len(ring) < 3:
        return tuple(sorted(ring))
    i = ring.index(min(ring))
    rotated = ring[i:] + ring[:i]
    reverse = (rotated[0], *reversed(rotated[1:]))
    return min(rotated, reverse)


def _greedy(start: str, members: list[str], links: Links) -> tuple[str, ...]:
    tour = [start]
    left = [m for m in members if m != start]  # kept sorted: max() keeps the lowest id on ties
    while left:
        here = tour[-1]
        nxt = max(
            left, key=lambda m: (edge(links, here, m).bandwidth, -edge(links, here, m).latency)
        )
        tour.append(nxt)
        left.remove(nxt)
    return tuple(tour)


def order_ring(members: Iterable[str], links: Links) -> tuple[str, ...]:
    """A ring over ``members`` (duplicates removed) that maximises the bottleneck link."""
    peers = sorted(set(members))
    if len(peers) < 3:
        return tuple(peers)
    best: tuple[str, ...] | None = None
    best_key: tuple[float, float] | None = None
    for start in peers:
        tour = canonical(_greedy(start, peers, links))
        key = (bottleneck(tour, links), -total_latency(tour, links))
        if (
            best_key is None
            or key > best_key
            or (key == best_key and best is not None and tour < best)
        ):
            best, best_key = tour, key
    assert best is not None
    return best
