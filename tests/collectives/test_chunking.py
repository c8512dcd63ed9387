from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.chunking import Span, chunk_spans, layout, sub_spans


@given(st.integers(0, 5000), st.integers(1, 70))
@settings(max_examples=200)
def test_chunks_cover_contiguously_and_evenly(n: int, parts: int) -> None:
    spans = chunk_spans(n, parts)
    assert len(spans) == parts
    assert spans[0].lo == 0 and spans[-1].hi == n
    for a, b in itertools.pairwise(spans):
        assert a.hi == b.lo
    sizes = [s.size for s in spans]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger chunks come first


@pytest.mark.parametrize(
    ("n", "parts", "sizes"),
    [
        (1, 4, [1, 0, 0, 0]),
        (3, 8, [1, 1, 1, 0, 0, 0, 0, 0]),
        (0, 3, [0, 0, 0]),
        (7, 3, [3, 2, 2]),
        (13, 5, [3, 3, 3, 2, 2]),
        (97, 1, [97]),
    ],
)
def test_odd_sizes(n: int, parts: int, sizes: list[int]) -> None:
    assert [s.size for s in chunk_spans(n, parts)] == sizes


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        chunk_spans(-1, 2)
    with pytest.raises(ValueError):
        chunk_spans(3, 0)
    with pytest.raises(ValueError):
        sub_spans(Span(0, 3), 0)
    with pytest.raises(ValueError):
        Span(3, 2)


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 40))
@settings(max_examples=200)
def test_sub_spans_split_a_chunk(lo: int, length: int, sub: int) -> None:
    chunk = Span(lo, lo + length)
    pieces = sub_spans(chunk, sub)
    assert len(pieces) == -(-length // sub)
    assert sum(p.size for p in pieces) == length
    assert all(0 < p.size <= sub for p in pieces)
    if pieces:
        assert pieces[0].lo == chunk.lo and pieces[-1].hi == chunk.hi


@given(st.integers(0, 500), st.integers(1, 9), st.integers(1, 50), st.sampled_from([2, 4]))
@settings(max_examples=100)
def test_layout_blocks_tile_the_buffer(n: int, parts: int, sub: int, item: int) -> None:
    lay = layout(n, parts, sub, lambda k: 8 + k * item)
    regions = sorted(
        (lay.region(c, k).start, lay.region(c, k).stop)
        for c in range(parts)
        for k in range(len(lay.subs[c]))
    )
    pos = 0
    for start, stop in regions:
        assert start == pos
        pos = stop
    assert pos == lay.total
    assert lay.total == sum(8 + s.size * item for subs in lay.subs for s in subs)
