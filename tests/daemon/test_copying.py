"""The client's multi-threaded copy into and out of shared memory (pure, in-process)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.client.copying import ParallelCopier, slabs


@given(length=st.integers(0, 10_000), parts=st.integers(1, 9), align=st.integers(1, 1024))
def test_slabs_cover_the_range_once_on_aligned_boundaries(length: int, parts: int,
                                                          align: int) -> None:
    ranges = slabs(length, parts, align)
    assert len(ranges) <= parts
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(length))
    assert all(a < b for a, b in ranges)
    assert all(b % align == 0 for _, b in ranges[:-1])


def _bits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    n = int(np.prod(shape))
    return np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32).view(
        np.float32).reshape(shape)


@pytest.fixture
def copier() -> Iterator[ParallelCopier]:
    c = ParallelCopier(threads=3, min_slab_bytes=4096)  # small slabs: threads on small data
    yield c
    c.close()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 700), cols=st.integers(1, 40), step=st.integers(1, 3),
       transpose=st.booleans())
def test_every_layout_is_copied_bit_exact(rows: int, cols: int, step: int,
                                          transpose: bool) -> None:
    c = ParallelCopier(threads=3, min_slab_bytes=1024)
    try:
        src = _bits((rows, cols * step), 1)[:, ::step]
        if transpose:
            src = src.T
        dst = np.zeros(src.shape, np.float32)
        c.copy(dst, src)
        assert np.array_equal(dst.view(np.uint32), src.view(np.uint32))
        # and back into a strided destination without touching the gaps
        backing = np.zeros((rows, cols * step), np.float32)
        target = backing[:, ::step].T if transpose else backing[:, ::step]
        c.copy(target, dst)
        assert np.array_equal(target.view(np.uint32), src.view(np.uint32))
        if step > 1:
            assert not backing[:, 1::step].any()
    finally:
        c.close()


class _Spy:
    """Records which threads call ``np.copyto`` (the copier looks it up per call)."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self._real = np.copyto

    def __enter__(self) -> _Spy:
        def spy(d: np.ndarray, s: np.ndarray, **kw: object) -> None:
            self.threads.add(threading.current_thread().name)
            self._real(d, s, **kw)  # type: ignore[arg-type]

        np.copyto = spy  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        np.copyto = self._real


def test_large_copies_are_split_across_threads(copier: ParallelCopier) -> None:
    src = _bits((1_000_000,), 2)
    dst = np.empty_like(src)
    with _Spy() as spy:
        copier.copy(dst, src)
    assert np.array_equal(dst.view(np.uint32), src.view(np.uint32))
    assert threading.current_thread().name in spy.threads  # the caller copies a slab too
    assert any(n.startswith("peerd-copy") for n in spy.threads)


def test_small_copies_stay_on_the_calling_thread() -> None:
    c = ParallelCopier(threads=4)  # default slab size: 8 MiB per thread at least
    try:
        src = _bits((1_000_000,), 4)  # 4 MB
        dst = np.empty_like(src)
        with _Spy() as spy:
            c.copy(dst, src)
        assert spy.threads == {threading.current_thread().name}
        assert np.array_equal(dst.view(np.uint32), src.view(np.uint32))
    finally:
        c.close()


def test_mismatches_are_refused_and_a_closed_copier_copies_inline(
        copier: ParallelCopier) -> None:
    with pytest.raises(ValueError):
        copier.copy(np.empty(10, np.float32), np.empty(11, np.float32))
    with pytest.raises(ValueError):
        copier.copy(np.empty(10, np.float32), np.empty(10, np.float64))
    with pytest.raises(ValueError):
        ParallelCopier(threads=0)
    copier.close()
    src = _bits((100_000,), 3)
    dst = np.empty_like(src)
    with _Spy() as spy:
        copier.copy(dst, src)
    assert spy.threads == {threading.current_thread().name}
    assert np.array_equal(dst.view(np.uint32), src.view(np.uint32))


def test_a_forked_child_copies_with_threads_of_its_own(copier: ParallelCopier) -> None:
    src = _bits((1_000_000,), 5)
    dst = np.empty_like(src)
    copier.copy(dst, src)  # the parent's workers exist now
    pid = os.fork()
    if pid == 0:  # child: must not wait forever on workers that were not forked
        code = 1
        try:
            out = np.empty_like(src)
            copier.copy(out, src)
            code = 0 if np.array_equal(out.view(np.uint32), src.view(np.uint32)) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child's copy hung")
