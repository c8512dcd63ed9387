"""Getting a caller's tensor into shared memory and the result back out.

Two paths:
- *shared arrays* (``Client.empty``/``Client.share``) live in a segment the
  daemon has mapped already, so an operation on them copies nothing;
- any other numpy array or torch CPU tensor is *staged*: copied into a pooled
  segment before the request and copied back (in place) after a successful
  reply. Failed operations never copy back, so inputs stay intact.

Segments are reused by size so a training loop's repeated all-reduces do not
pay for new pages (allocating and zeroing fresh shared memory costs several
times the copy). The copies themselves run on a few threads
(``copying.ParallelCopier``): one thread's copy reaches only part of the
memory bandwidth, and a staged hand-off copies every byte twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from collectives.arrays import out_mismatch, out_overlaps
from peerd.client.copying import ParallelCopier
from peerd.daemon import protocol as p
from peerd.daemon.shm import Segment
from peerd.errors import ConfigError

MAX_IDLE_BYTES = 4 * 1024**3  # pooled but unused segments kept for reuse


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view of a numpy array or a CPU torch tensor (shares memory)."""
    if isinstance(array, np.ndarray):
        return array
    import torch

    if isinstance(array, torch.Tensor):
        if array.device.type != "cpu":
            raise ConfigError(f"tensor is on {array.device}; move it to the CPU first")
        if array.dtype == torch.bfloat16:  # numpy has none: the same memory as uint16 bits
            return array.detach().view(torch.int16).numpy().view(np.uint16)
        return array.detach().numpy()
    raise ConfigError(f"expected a numpy array or a torch CPU tensor, got {type(array).__name__}")


def dtype_text(array: Any, view: np.ndarray) -> str:
    """``TensorRef.dtype`` for ``array``, whose numpy view is ``view``."""
    if type(array).__module__.startswith("torch") and str(array.dtype) == "torch.bfloat16":
        return p.BF16_DTYPE
    return view.dtype.str


def check_out(array: Any, out: Any) -> None:
    """``out`` can take the all-reduce of ``array``: as many elements of the
    same dtype, and memory of its own (or the input's very memory)."""
    src, dst = as_numpy(array), as_numpy(out)
    kinds = dtype_text(array, src), dtype_text(out, dst)
    if kinds[0] != kinds[1] or src.size != dst.size:
        raise out_mismatch(dst.size, _name(kinds[1]), src.size, _name(kinds[0]))
    same = (src.__array_interface__["data"][0] == dst.__array_interface__["data"][0]
            and src.strides == dst.strides)
    if not same and np.shares_memory(src, dst):
        raise out_overlaps()


def _name(dtype: str) -> str:
    return dtype if dtype == p.BF16_DTYPE else np.dtype(dtype).name


def _base_address(segment: Segment) -> int:
    view = np.frombuffer(segment.mapping, dtype=np.uint8, count=1)
    address = int(view.ctypes.data)
    del view
    return address


class SegmentPool:
    """Segments registered with the daemon on one connection.

    ``register`` is the connection's way of handing a new segment to the daemon
    (returns its id); ``release`` tells the daemon to unmap one.
    """

    def __init__(self, register: Callable[[Segment], int],
                 release: Callable[[int], None]) -> None:
        self._register = register
        self._release = release
        self._lock = threading.Lock()
        self._idle: list[tuple[int, Segment]] = []
        self._shared: list[tuple[int, int, Segment]] = []  # (base address, id, segment)

    # ------------------------------------------------------------ staging

    def lease(self, nbytes: int) -> tuple[int, Segment]:
        """A segment of at least ``nbytes`` (reused when one fits well)."""
        with self._lock:
            best = None
            for i, (_, seg) in enumerate(self._idle):
                if nbytes <= seg.size <= 2 * nbytes + 65536 and (
                        best is None or seg.size < self._idle[best][1].size):
                    best = i
            if best is not None:
                return self._idle.pop(best)
        seg = Segment.create(nbytes, "peerd-staging")
        return self._register(seg), seg

    def give_back(self, seg_id: int, seg: Segment) -> None:
        with self._lock:
            self._idle.append((seg_id, seg))
            evict = []
            while sum(s.size for _, s in self._idle) > MAX_IDLE_BYTES and len(self._idle) > 1:
                evict.append(self._idle.pop(0))
        for old_id, old in evict:
            self._release(old_id)
            old.close()

    # ------------------------------------------------------------ shared arrays

    def new_shared(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        seg = Segment.create(nbytes, "peerd-shared")
        seg_id = self._register(seg)
        with self._lock:
            self._shared.append((_base_address(seg), seg_id, seg))
        count = nbytes // dtype.itemsize
        return np.frombuffer(seg.mapping, dtype=dtype, count=count).reshape(shape)

    def locate(self, arr: np.ndarray, dtype: str) -> p.TensorRef | None:
        """The ref of ``arr`` (whose elements are ``dtype``) if it is a
        contiguous view into a shared segment."""
        if not arr.flags.c_contiguous or arr.dtype.kind not in "fiub":
            return None
        address = int(arr.__array_interface__["data"][0])
        with self._lock:
            for base, seg_id, seg in self._shared:
                if base <= address and address + arr.nbytes <= base + seg.size:
                    offset = address - base
                    if offset % arr.dtype.itemsize == 0:
                        return p.TensorRef(seg_id, offset, dtype, tuple(arr.shape))
        return None

    def close(self) -> None:
        with self._lock:
            segs = [s for _, s in self._idle] + [s for _, _, s in self._shared]
            self._idle.clear()
            self._shared.clear()
        for seg in segs:
            seg.close()


class Staged:
    """One caller array placed in shared memory for the length of one request.

    ``fill=False`` stages a destination: the daemon only writes the segment,
    so the caller's values are not copied in.
    """

    def __init__(self, pool: SegmentPool, array: Any, copier: ParallelCopier, *,
                 fill: bool = True) -> None:
        self.user = as_numpy(array)
        if self.user.dtype.kind not in "fiub":
            raise ConfigError(f"unsupported dtype {self.user.dtype}")
        self.dtype = dtype_text(array, self.user)
        self._pool = pool
        self._copier = copier
        self._lease: tuple[int, Segment] | None = None
        ref = pool.locate(self.user, self.dtype)
        if ref is None:
            seg_id, seg = pool.lease(max(self.user.nbytes, 1))
            self._lease = (seg_id, seg)
            ref = p.TensorRef(seg_id, 0, self.dtype, tuple(self.user.shape))
            if fill:
                try:
                    copier.copy(seg.array(ref), self.user)
                except BaseException:
                    self.done()
                    raise
        self.ref = ref

    @property
    def leased(self) -> bool:
        """True when the array has a staging segment of its own (it is not in
        shared memory)."""
        return self._lease is not None

    def copy_back(self) -> None:
        """Write the daemon's result into the caller's array (in place)."""
        if self._lease is not None:
            self._copier.copy(self.user, self._lease[1].array(self.ref))

    def done(self) -> None:
        """Return the staging segment; call once the daemon has answered."""
        if self._lease is not None:
            self._pool.give_back(*self._lease)
            self._lease = None


class StagedReduce:
    """The segments of one all-reduce: the input and, where the result goes
    elsewhere, its destination."""

    def __init__(self, source: Staged, dest: Staged | None) -> None:
        self.source = source
        self.dest = dest

    def copy_back(self) -> None:
        """Write the daemon's result into the caller's destination (or array)."""
        (self.dest or self.source).copy_back()

    def done(self) -> None:
        self.source.done()
        if self.dest is not None:
            self.dest.done()
