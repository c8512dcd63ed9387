"""The scratch pool reuses buffers by exact size and stays within its bounds."""

from __future__ import annotations

import numpy as np

from collectives.scratch import ScratchPool


def test_reuses_same_size_only() -> None:
    pool = ScratchPool(max_buffers=4, max_bytes=1 << 20)
    a = pool.take(1000)
    assert a.nbytes == 1000 and a.dtype == np.uint8
    pool.give(a)
    assert pool.take(999) is not a
    assert pool.take(1000) is a
    assert pool.take(1000) is not a  # handed out once only
    s = pool.statistics()
    assert (s.hits, s.misses, s.pooled, s.pooled_bytes) == (1, 3, 0, 0)


def test_bounded_by_count_and_bytes_dropping_oldest() -> None:
    pool = ScratchPool(max_buffers=2, max_bytes=3000)
    bufs = [pool.take(n) for n in (1000, 1100, 1200)]
    for b in bufs:
        pool.give(b)
    s = pool.statistics()
    assert (s.pooled, s.pooled_bytes) == (2, 2300)
    assert pool.take(1000) is not bufs[0]  # the oldest went first
    assert pool.take(1200) is bufs[2]
    pool.give(pool.take(5000))  # larger than the whole budget: not kept
    assert pool.statistics().pooled_bytes == 1100


def test_refuses_foreign_buffers() -> None:
    pool = ScratchPool()
    pool.give(np.zeros(10, dtype=np.float32))
    pool.give(np.zeros((2, 5), dtype=np.uint8))
    pool.give(np.zeros(0, dtype=np.uint8))
    assert pool.statistics().pooled == 0
