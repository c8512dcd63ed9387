"""Shared-memory tensor hand-off between a client and its daemon.

A segment is an anonymous ``memfd`` (no name in any file system, so nothing
leaks when either side is killed) mapped by both processes; its file
descriptor travels over the control socket as SCM_RIGHTS ancillary data. The
creator seals it against shrinking and growing before handing it over, and the
receiver refuses unsealed descriptors: without the seal a client could
truncate the file under the daemon's mapping and crash it with SIGBUS.

``TensorRef`` (dtype, shape, offset) names an array inside a segment;
``array`` turns one into a numpy view after checking every field, because the
ref comes from another process.
"""

from __future__ import annotations

import array as _array
import contextlib
import fcntl
import math
import mmap
import os
import socket
import stat

import numpy as np

from peerd.daemon.protocol import BF16_DTYPE, MAX_DIMS, TensorRef
from peerd.errors import ProtocolError

PAGE = mmap.PAGESIZE
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
ALLOWED_KINDS = "fiub"
MAX_FDS_PER_MESSAGE = 4


class Segment:
    """One sealed memfd mapped read-write into this process."""

    def __init__(self, size: int, mapping: mmap.mmap, fd: int | None) -> None:
        self.size = size
        self.mapping = mapping
        self._fd = fd  # kept only until handed over (``take_fd``)

    @classmethod
    def create(cls, size: int, name: str = "peerd-tensor") -> Segment:
        size = max(PAGE, -(-size // PAGE) * PAGE)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(size, mapping, fd)

    @classmethod
    def attach(cls, fd: int, size: int) -> Segment:
        """Map a received descriptor (which this call then owns and closes)."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError("shared segment is not a memory file")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise ProtocolError("shared segment does not support sealing") from None
            if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != \
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
                raise ProtocolError("shared segment is not sealed against resizing")
            if size <= 0 or st.st_size != size:
                raise ProtocolError(f"shared segment size {st.st_size} != announced {size}")
            try:
                mapping = mmap.mmap(fd, size)
            except OSError as exc:
                raise ProtocolError(f"cannot map shared segment: {exc}") from None
        finally:
            os.close(fd)
        return cls(size, mapping, None)

    def take_fd(self) -> int:
        if self._fd is None:
            raise ValueError("descriptor already handed over")
        fd, self._fd = self._fd, None
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # A live numpy view keeps the mapping; it is unmapped when the view goes.
        with contextlib.suppress(BufferError):
            self.mapping.close()

    def array(self, ref: TensorRef) -> np.ndarray:
        return array_in(self.mapping, self.size, ref)


def check_dtype(text: str) -> np.dtype:
    """The numpy dtype a ``TensorRef`` names (bfloat16: its bits, as uint16)."""
    if text == BF16_DTYPE:
        return np.dtype(np.uint16)
    try:
        dt = np.dtype(text)
    except (TypeError, ValueError):
        raise ProtocolError(f"unsupported dtype {text!r}") from None
    if dt.kind not in ALLOWED_KINDS or dt.itemsize > 16 or dt.fields is not None:
        raise ProtocolError(f"unsupported dtype {text!r}")
    return dt


def nbytes_of(ref: TensorRef) -> int:
    dt = check_dtype(ref.dtype)
    if len(ref.shape) > MAX_DIMS or any(d < 0 for d in ref.shape):
        raise ProtocolError(f"bad tensor shape {ref.shape}")
    return math.prod(ref.shape) * dt.itemsize


def array_in(buffer: mmap.mmap, size: int, ref: TensorRef) -> np.ndarray:
    """The numpy view ``ref`` names inside ``buffer`` (bounds and dtype checked)."""
    n = nbytes_of(ref)
    dt = check_dtype(ref.dtype)
    if ref.offset < 0 or ref.offset % dt.itemsize or ref.offset + n > size:
        raise ProtocolError(f"tensor [{ref.offset}, {ref.offset + n}) outside segment of {size}")
    count = n // dt.itemsize
    return np.frombuffer(buffer, dtype=dt, count=count, offset=ref.offset).reshape(ref.shape)


class SegmentTable:
    """Segments one connection has registered, by id (daemon or client side)."""

    def __init__(self, max_segments: int = 1024) -> None:
        self._segments: dict[int, Segment] = {}
        self._max = max_segments

    def add(self, segment_id: int, segment: Segment) -> None:
        if segment_id in self._segments:
            segment.close()
            raise ProtocolError(f"segment {segment_id} registered twice")
        if len(self._segments) >= self._max:
            segment.close()
            raise ProtocolError(f"more than {self._max} shared segments on one connection")
        self._segments[segment_id] = segment

    def get(self, segment_id: int) -> Segment:
        seg = self._segments.get(segment_id)
        if seg is None:
            raise ProtocolError(f"unknown shared segment {segment_id}")
        return seg

    def array(self, ref: TensorRef) -> np.ndarray:
        return self.get(ref.segment).array(ref)

    def release(self, segment_id: int) -> None:
        seg = self._segments.pop(segment_id, None)
        if seg is not None:
            seg.close()

    def close_all(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()

    def __len__(self) -> int:
        return len(self._segments)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())


def fds_ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """SCM_RIGHTS ancillary data carrying ``fds`` (for ``sendmsg``)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _array.array("i", fds).tobytes())]


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """File descriptors received in ``recvmsg`` ancillary data, in order."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _array.array("i").itemsize
            fds.extend(_array.array("i", data[:usable]))
    return fds


def ancillary_space() -> int:
    return socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _array.array("i").itemsize)
