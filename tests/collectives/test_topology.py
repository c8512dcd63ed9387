from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.topology import (
    TWO_OPT_PASSES,
    LinkEstimate,
    _two_opt,
    bottleneck,
    canonical,
    link_class,
    order_ring,
)

GBIT = 125e6


def full(members: list[str], bw: float, lat: float = 0.01) -> dict[tuple[str, str], LinkEstimate]:
    return {(a, b): LinkEstimate(bw, lat) for a in members for b in members if a != b}


def test_no_measurements_gives_sorted_ring() -> None:
    assert order_ring(["d", "b", "a", "c"], {}) == ("a", "b", "c", "d")
    assert order_ring(["b", "a"], {}) == ("a", "b")
    assert order_ring(["a", "a"], {}) == ("a",)


def test_two_clusters_are_crossed_only_twice() -> None:
    east, west = ["a", "c", "e"], ["b", "d", "f"]
    members = east + west
    links = full(members, 0.01 * GBIT)
    links.update(full(east, GBIT))
    links.update(full(west, GBIT))
    links[("a", "b")] = links[("b", "a")] = LinkEstimate(0.5 * GBIT, 0.05)
    links[("e", "f")] = links[("f", "e")] = LinkEstimate(0.5 * GBIT, 0.05)
    ring = order_ring(members, links)
    crossings = sum(
        (ring[i] in east) != (ring[(i + 1) % len(ring)] in east) for i in range(len(ring))
    )
    assert crossings == 2
    assert bottleneck(ring, links) == 0.5 * GBIT
    assert bottleneck(tuple(sorted(members)), links) == 0.01 * GBIT


def test_one_slow_link_is_avoided() -> None:
    members = ["a", "b", "c", "d"]
    links = full(members, GBIT)
    links[("a", "b")] = LinkEstimate(1e5, 0.2)  # only one direction measured slow
    ring = order_ring(members, links)
    pairs = {frozenset((ring[i], ring[(i + 1) % 4])) for i in range(4)}
    assert frozenset(("a", "b")) not in pairs


def test_readings_of_one_class_tie_and_resolve_by_id() -> None:
    members = ["a", "b", "c", "d", "e"]
    rnd = random.Random(3)
    # Within a power of two of bandwidth and a millisecond of latency: noise.
    noisy = {(a, b): LinkEstimate(rnd.uniform(2**24, 2**25 - 1), rnd.uniform(0.002, 0.0029))
             for a in members for b in members if a != b}
    assert order_ring(members, noisy) == tuple(members)
    # Beyond what a 1 MiB probe can resolve, any reading is just "fast".
    fast = {(a, b): LinkEstimate(rnd.choice([2e8, 3e9, 1e12]), 0.0)
            for a in members for b in members if a != b}
    assert order_ring(members, fast) == tuple(members)
    # A class apart is a real difference: the ring avoids the slower link.
    noisy[("a", "b")] = LinkEstimate(2**23, 0.002)
    ring = order_ring(members, noisy)
    assert frozenset(("a", "b")) not in {frozenset((ring[i], ring[(i + 1) % 5])) for i in range(5)}
    assert link_class(noisy, "a", "b") < link_class(noisy, "a", "c")
    # Absurd but well-formed reports (a member's messages allow any finite figure).
    noisy[("c", "d")] = LinkEstimate(1e308, 1e308)
    assert sorted(order_ring(members, noisy)) == members


def test_canonical_is_rotation_and_reflection_invariant() -> None:
    ring = ("c", "a", "d", "b")
    variants = {ring[i:] + ring[:i] for i in range(4)}
    variants |= {tuple(reversed(v)) for v in variants}
    assert len({canonical(v) for v in variants}) == 1


@st.composite
def matrices(draw: st.DrawFn) -> tuple[list[str], dict[tuple[str, str], LinkEstimate]]:
    n = draw(st.integers(1, 7))
    members = [f"p{i}" for i in range(n)]
    links = {}
    for a, b in itertools.permutations(members, 2):
        if draw(st.booleans()):
            links[(a, b)] = LinkEstimate(draw(st.sampled_from([1e5, 1e6, 1e7, 1e8])), 0.01)
    return members, links


@given(matrices(), st.randoms())
@settings(max_examples=100)
def test_ring_is_a_deterministic_permutation_no_worse_than_sorted(case, rnd) -> None:  # type: ignore[no-untyped-def]
    members, links = case
    ring = order_ring(members, links)
    assert sorted(ring) == members
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert order_ring(shuffled, dict(reversed(list(links.items())))) == ring
    assert bottleneck(ring, links) >= bottleneck(tuple(members), links)


def _rescored_two_opt(tour: tuple[str, ...], cls: dict) -> tuple[str, ...]:  # type: ignore[type-arg]
    """2-opt that rescores every candidate tour in full: what ``_two_opt``
    must match while looking at only the two hops a reversal changes."""

    def score(t: tuple[str, ...]) -> tuple[tuple[float, ...], int]:
        hops = [cls[t[i - 1], t[i]] for i in range(len(t))]
        return tuple(sorted(h[0] for h in hops)), -sum(h[1] for h in hops)

    best, best_score = tour, score(tour)
    for _ in range(TWO_OPT_PASSES):
        improved = False
        for i in range(1, len(best) - 1):
            for j in range(i + 1, len(best)):
                cand = best[:i] + best[i : j + 1][::-1] + best[j + 1 :]
                if score(cand) > best_score:
                    best, best_score, improved = cand, score(cand), True
        if not improved:
            break
    return best


@given(st.integers(3, 12), st.randoms())
@settings(max_examples=150)
def test_two_opt_looking_at_two_hops_matches_full_rescoring(n, rnd) -> None:  # type: ignore[no-untyped-def]
    members = [f"p{i:02d}" for i in range(n)]
    links = {
        (a, b): LinkEstimate(rnd.choice([1e5, 3e6, 1e7, 1e8, 2e9]) * rnd.uniform(0.7, 1.3),
                             rnd.choice([0.0005, 0.002, 0.05]))
        for a in members for b in members if a != b and rnd.random() < 0.85
    }
    cls = {(a, b): link_class(links, a, b) for a in members for b in members if a != b}
    tour = list(members)
    rnd.shuffle(tour)
    assert _two_opt(tuple(tour), cls) == _rescored_two_opt(tuple(tour), cls)
