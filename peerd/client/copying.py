"""Copying large arrays into and out of shared memory with several threads.

A staged hand-off moves every byte twice (into the segment before the request,
back out after the reply), and one thread's ``memcpy`` reaches only part of the
machine's memory bandwidth. numpy releases the GIL while it copies plain
dtypes, so splitting a large copy into a few slabs along the first axis and
copying them on a small thread pool gets the rest; the caller's thread copies
one slab itself. Small arrays are copied inline: a thread hand-off costs tens of
microseconds, more than a copy of a few megabytes saves.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

MAX_DEFAULT_THREADS = 4  # beyond this memory bandwidth, not threads, is the limit
MIN_SLAB_BYTES = 8 * 1024 * 1024  # below this per thread, threads cost more than they save


def default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cpus))


def slabs(length: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` (or fewer) consecutive ``[start, stop)`` ranges covering ``length``;
    every boundary but the last is a multiple of ``align``."""
    if length <= 0:
        return []
    parts = max(1, min(parts, length))
    step = -(-length // parts)
    step = -(-step // align) * align
    return [(start, min(start + step, length)) for start in range(0, length, step)]


class ParallelCopier:
    """``copy(dst, src)``: ``np.copyto`` split across up to ``threads`` threads.

    Thread-safe; the workers start on first use and stop at ``close``.
    """

    def __init__(self, threads: int | None = None, min_slab_bytes: int = MIN_SLAB_BYTES) -> None:
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"copy threads must be >= 1, got {threads}")
        self._min_slab = max(1, min_slab_bytes)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._closed = False

    def _executor(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._closed:
                return None  # copy inline after close rather than fail
            # A forked child inherits the executor but not its threads: start anew.
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.threads - 1,
                                                thread_name_prefix="peerd-copy")
                self._pool_pid = os.getpid()
            return self._pool

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Write ``src`` into ``dst`` (same shape and dtype; no casting, no overlap)."""
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"copy between {src.dtype}{src.shape} and {dst.dtype}{dst.shape}")
        parts = min(self.threads, dst.nbytes // self._min_slab)
        if parts < 2 or dst.ndim == 0:
            np.copyto(dst, src, casting="no")
            return
        if dst.flags.c_contiguous and src.flags.c_contiguous:
            dst, src = dst.reshape(-1), src.reshape(-1)
        # Slab boundaries on whole pages of contiguous data keep each thread's
        # writes on its own pages (and cache lines).
        row_bytes = dst.nbytes // dst.shape[0] if dst.shape[0] else 1
        align = max(1, 4096 // row_bytes) if dst.ndim == 1 else 1
        ranges = slabs(dst.shape[0], parts, align)
        pool = self._executor() if len(ranges) > 1 else None
        if pool is None:
            np.copyto(dst, src, casting="no")
            return
        futures: list[Future[None]] = []
        inline = ranges[:1]
        try:
            for a, b in ranges[1:]:
                futures.append(pool.submit(np.copyto, dst[a:b], src[a:b], casting="no"))
        except RuntimeError:  # closed meanwhile: copy what was not handed out here
            inline = [ranges[0], *ranges[1 + len(futures):]]
        try:
            for a, b in inline:
                np.copyto(dst[a:b], src[a:b], casting="no")
        finally:
            for fut in futures:  # wait for every slab, even if ours failed
                fut.exception()
        for fut in futures:
            fut.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
