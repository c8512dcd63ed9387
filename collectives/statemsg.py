"""Messages of shared-state sync and point-to-point collectives (wire ids 240-249).

Every one is validated on decode (``peerd.wire.decode_untrusted`` turns a
failed ``__post_init__`` into a ``ProtocolError``): an announced tensor's
digest must match its piece hashes, sizes must match dtype and shape, and
counts are bounded, so nothing a peer sends can make us allocate blindly.
"""

from __future__ import annotations

from dataclasses import dataclass

from collectives.api import SyncStrategy
from collectives.messages import MAX_ID
from collectives.state import (
    HASH_BYTES,
    TensorInfo,
    expected_nbytes,
    piece_count,
    state_digest,
    tensor_digest,
)
from peerd.wire import message

MAX_TENSORS = 65536
MAX_DIMS = 32
MAX_NAME = 1024
MAX_ARRAY_BYTES = 1 << 40
MAX_FETCH = 65536  # pieces in one fetch request (the wire caps a list at 100k items)


def _check_shape(dtype: str, shape: tuple[int, ...]) -> int:
    if len(shape) > MAX_DIMS:
        raise ValueError("too many dimensions")
    nbytes = expected_nbytes(dtype, shape)
    if nbytes > MAX_ARRAY_BYTES:
        raise ValueError("tensor too large")
    return nbytes


@message(240)
@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[bytes, ...]
    digest: bytes

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= MAX_NAME:
            raise ValueError("bad tensor name length")
        nbytes = _check_shape(self.dtype, self.shape)
        if len(self.pieces) != piece_count(nbytes):
            raise ValueError("piece count does not match the tensor size")
        if any(len(p) != HASH_BYTES for p in self.pieces):
            raise ValueError("bad piece hash length")
        if self.digest != tensor_digest(self.dtype, self.shape, nbytes, self.pieces):
            raise ValueError("tensor digest does not match its pieces")

    @property
    def info(self) -> TensorInfo:
        nbytes = expected_nbytes(self.dtype, self.shape)
        return TensorInfo(self.dtype, self.shape, nbytes, self.pieces, self.digest)

    @staticmethod
    def of(name: str, info: TensorInfo) -> TensorEntry:
        return TensorEntry(name, info.dtype, info.shape, info.pieces, info.digest)


@message(241)
@dataclass(frozen=True)
class Announce:
    """A member's state at a sync: its revision, strategy and tensors."""

    run: str
    revision: int  # the state's revision (the caller's), not the view's
    strategy: SyncStrategy
    tensors: tuple[TensorEntry, ...]

    def __post_init__(self) -> None:
        if not 0 < len(self.run) <= MAX_ID:
            raise ValueError("bad run name length")
        if len(self.tensors) > MAX_TENSORS:
            raise ValueError("too many tensors")
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicate tensor names")

    def infos(self) -> dict[str, TensorInfo]:
        return {t.name: t.info for t in self.tensors}

    @property
    def digest(self) -> bytes:
        return state_digest({t.name: t.digest for t in self.tensors})


@message(242)
@dataclass(frozen=True)
class Fetch:
    """Send me these pieces of the state you exposed under ``key``, each under
    ``key + b"%d/%d.%d" % (round, tensor, piece)``."""

    run: str
    key: bytes
    round: int
    tensors: tuple[int, ...]
    pieces: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 < len(self.run) <= MAX_ID:
            raise ValueError("bad run name length")
        if not 0 < len(self.key) <= 128 or self.round < 0:
            raise ValueError("bad fetch key")
        if len(self.tensors) != len(self.pieces) or len(self.tensors) > MAX_FETCH:
            raise ValueError("bad piece list")
        if any(i < 0 for i in self.tensors) or any(i < 0 for i in self.pieces):
            raise ValueError("negative piece index")


@message(243)
@dataclass(frozen=True)
class FetchDone:
    sent: int  # bytes sent

    def __post_init__(self) -> None:
        if self.sent < 0:
            raise ValueError("negative byte count")


@message(244)
@dataclass(frozen=True)
class ArrayHeader:
    """Dtype and shape of an array sent point to point; the bytes follow."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_shape(self.dtype, self.shape)

    @property
    def nbytes(self) -> int:
        return expected_nbytes(self.dtype, self.shape)
