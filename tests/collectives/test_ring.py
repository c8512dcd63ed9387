"""The schedules, checked by simulating the ring symbolically."""

from __future__ import annotations

import itertools

import pytest

from collectives.ring import (
    all_gather_schedule,
    left,
    owned_chunk,
    owner_of,
    reduce_scatter_schedule,
    reduction_order,
    right,
)

SIZES = list(range(1, 13))


@pytest.mark.parametrize("size", SIZES)
def test_reduce_scatter_builds_each_chunk_in_view_order(size: int) -> None:
    # partial[rank][chunk] = ranks whose inputs were added, in order
    partial = [{c: [r] for c in range(size)} for r in range(size)]
    for s in range(size - 1):
        sends = {}
        for r in range(size):
            step = reduce_scatter_schedule(r, size)[s]
            sends[right(r, size)] = (step.send, list(partial[r][step.send]))
        for r in range(size):
            step = reduce_scatter_schedule(r, size)[s]
            chunk, contributors = sends[r]
            assert chunk == step.recv  # what the left neighbour sends is what I expect
            partial[r][chunk] = [*contributors, r]
    for r in range(size):
        c = owned_chunk(r, size)
        assert partial[r][c] == list(reduction_order(c, size))
        assert owner_of(c, size) == r


@pytest.mark.parametrize("size", SIZES)
def test_received_chunk_is_sent_next_step(size: int) -> None:
    for r in range(size):
        rs = reduce_scatter_schedule(r, size)
        ag = all_gather_schedule(r, size)
        assert len(rs) == len(ag) == size - 1
        for a, b in itertools.pairwise(rs):
            assert a.recv == b.send
        for a, b in itertools.pairwise(ag):
            assert a.recv == b.send
        if ag:
            assert ag[0].send == owned_chunk(r, size)
            assert rs[-1].recv == owned_chunk(r, size)


@pytest.mark.parametrize("size", SIZES)
def test_all_gather_delivers_every_final_chunk_once(size: int) -> None:
    have = [{owned_chunk(r, size)} for r in range(size)]
    received = [[] for _ in range(size)]
    for s in range(size - 1):
        sends = {}
        for r in range(size):
            step = all_gather_schedule(r, size)[s]
            assert step.send in have[r]
            sends[right(r, size)] = step.send
        for r in range(size):
            step = all_gather_schedule(r, size)[s]
            assert sends[r] == step.recv
            received[r].append(step.recv)
            have[r].add(step.recv)
    for r in range(size):
        assert have[r] == set(range(size))
        assert len(received[r]) == len(set(received[r])) == size - 1
        assert owned_chunk(r, size) not in received[r]


def test_neighbours_and_range_checks() -> None:
    assert right(3, 4) == 0 and left(0, 4) == 3
    assert right(0, 1) == 0 == left(0, 1)
    with pytest.raises(ValueError):
        reduce_scatter_schedule(4, 4)
    with pytest.raises(ValueError):
        owned_chunk(0, 0)
