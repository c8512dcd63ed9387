"""Scratch buffers of ring all-reduces, kept for the next round of the same size.

Fresh anonymous memory costs a page fault per 4 KiB page when first written;
measured on this project's 2-core VMs that is 0.4-1.6 ms per MB, more than
encrypting the same bytes takes, and a ring writes its whole scratch buffer
every round. Training loops all-reduce the same sizes round after round, so a
finished round's buffer is kept (bounded in count and bytes, most recent
first) and handed to the next round that needs exactly that many bytes.

A buffer is given back only when nothing can touch it any more: after the
result was copied out, or after the ring stopped every send and receive.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import numpy as np

MAX_POOLED: Final = 4
MAX_POOLED_BYTES: Final = 4 << 30


@dataclass(frozen=True)
class PoolStats:
    hits: int
    misses: int
    pooled: int
    pooled_bytes: int


class ScratchPool:
    """Free byte buffers by size; ``take`` reuses one or allocates, ``give`` keeps it."""

    def __init__(self, max_buffers: int = MAX_POOLED, max_bytes: int = MAX_POOLED_BYTES) -> None:
        self._max_buffers = max_buffers
        self._max_bytes = max_bytes
        self._free: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._count = 0
        self.hits = 0
        self.misses = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes``; its contents are unspecified."""
        free = self._free.get(nbytes)
        if free:
            buf = free.pop()
            if not free:
                del self._free[nbytes]
            self._bytes -= nbytes
            self._count -= 1
            self.hits += 1
            return buf
        self.misses += 1
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        """Keep ``buf`` for a later ``take``; the caller must not use it again."""
        n = int(buf.nbytes)
        if buf.dtype != np.uint8 or buf.ndim != 1 or n > self._max_bytes or not n:
            return
        self._free.setdefault(n, []).append(buf)
        self._free.move_to_end(n)
        self._bytes += n
        self._count += 1
        while self._count > self._max_buffers or self._bytes > self._max_bytes:
            size, bufs = next(iter(self._free.items()))  # least recently given size
            bufs.pop(0)
            if not bufs:
                del self._free[size]
            self._bytes -= size
            self._count -= 1

    def clear(self) -> None:
        self._free.clear()
        self._bytes = self._count = 0

    def statistics(self) -> PoolStats:
        return PoolStats(self.hits, self.misses, self._count, self._bytes)


# One per process: rounds of every engine in it share the budget.
POOL: Final = ScratchPool()
