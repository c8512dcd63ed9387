"""Shared-state sync: pure decisions (no I/O, no clock reads).

A shared state is a set of named tensors plus a revision. Each tensor's bytes
are cut into pieces of ``PIECE_BYTES``; a tensor's digest is the BLAKE3 hash
of its header (dtype, shape, size) and its piece hashes, so a downloader can
verify every piece on arrival and blame exactly the holder that served it.

This module decides, from what every member announced: which state is
popular (``popular``), which tensors a peer must download (``plan_downloads``)
and which holder serves which piece (``assign``). Every member computes the
same answers from the same announcements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import blake3

from collectives.api import SyncStrategy
from peerd.errors import ConfigError

PIECE_BYTES = 1 << 20  # protocol constant: the unit of hashing and of striping
HASH_BYTES = 32
_DOMAIN = b"peerd/state/v1\0"

# dtype name -> bytes per element; names as numpy's ``dtype.name`` and torch's
# ``str(dtype)`` without "torch." spell them, so numpy and torch peers agree.
ITEMSIZE: dict[str, int] = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16,
}


def piece_count(nbytes: int) -> int:
    return -(-nbytes // PIECE_BYTES)


def piece_span(nbytes: int, index: int) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` of piece ``index`` of a tensor of ``nbytes``."""
    lo = index * PIECE_BYTES
    return lo, min(nbytes, lo + PIECE_BYTES)


def hash_piece(data: bytes | memoryview | object) -> bytes:
    return blake3.blake3(data).digest()  # type: ignore[arg-type]


def tensor_digest(
    dtype: str, shape: tuple[int, ...], nbytes: int, pieces: Sequence[bytes]
) -> bytes:
    h = blake3.blake3(_DOMAIN)
    h.update(f"{dtype}|{','.join(map(str, shape))}|{nbytes}|".encode())
    for p in pieces:
        h.update(p)
    return h.digest()


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    if dtype not in ITEMSIZE:
        raise ValueError(f"unsupported dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise ValueError("negative dimension")
    return math.prod(shape) * ITEMSIZE[dtype]


def state_digest(tensors: Mapping[str, bytes]) -> bytes:
    """Content hash of a whole state: its names and tensor digests, name-sorted."""
    h = blake3.blake3(_DOMAIN)
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + tensors[name])
    return h.digest()


# ---------------------------------------------------------------- the popular rule


@dataclass(frozen=True)
class Vote:
    """What one member contributes to the popular-state decision."""

    revision: int
    strategy: SyncStrategy
    digest: bytes  # ``state_digest`` of its tensors


@dataclass(frozen=True)
class Popular:
    revision: int
    digest: bytes
    holders: tuple[str, ...]  # voters of the winning state, in the given (view) order


def popular(votes: Mapping[str, Vote], order: Iterable[str] | None = None) -> Popular | None:
    """The winning state, or ``None`` when nobody votes.

    Members in ``RECEIVE_ONLY`` mode do not vote. Votes are grouped by
    (revision, digest); most votes wins; a tie goes to the higher revision,
    then to the smaller digest, so every member picks the same state.
    """
    groups: dict[tuple[int, bytes], list[str]] = {}
    for peer in order if order is not None else votes:
        v = votes[peer]
        if v.strategy != SyncStrategy.RECEIVE_ONLY:
            groups.setdefault((v.revision, v.digest), []).append(peer)
    if not groups:
        return None
    key = min(groups, key=lambda k: (-len(groups[k]), -k[0], k[1]))
    return Popular(key[0], key[1], tuple(groups[key]))


# ---------------------------------------------------------------- what to fetch


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as announced: enough to check compatibility and verify pieces."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    pieces: tuple[bytes, ...]
    digest: bytes


@dataclass(frozen=True)
class PieceRef:
    tensor: int  # index in the winner's name-sorted tensor list
    piece: int
    nbytes: int


def plan_downloads(
    mine: Mapping[str, TensorInfo], winner: Mapping[str, TensorInfo]
) -> tuple[str, ...]:
    """Names of the tensors whose bytes differ from the winner's, name-sorted.

    Raises ``ConfigError`` when the two states cannot be reconciled in place:
    different names, shapes or dtypes.
    """
    if set(mine) != set(winner):
        missing = sorted(set(winner) - set(mine))
        extra = sorted(set(mine) - set(winner))
        raise ConfigError(
            f"shared state names differ from the popular state: missing {missing[:5]}, "
            f"extra {extra[:5]}"
        )
    out = []
    for name in sorted(winner):
        a, b = mine[name], winner[name]
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            raise ConfigError(
                f"tensor {name!r} is {a.dtype}{list(a.shape)} here but "
                f"{b.dtype}{list(b.shape)} in the popular state"
            )
        if a.digest != b.digest:
            out.append(name)
    return tuple(out)


def needed_pieces(winner: Mapping[str, TensorInfo], names: Iterable[str]) -> list[PieceRef]:
    """Every piece of ``names``, in (tensor index, piece) order."""
    index = {n: i for i, n in enumerate(sorted(winner))}
    out = []
    for name in names:
        info = winner[name]
        for k in range(len(info.pieces)):
            lo, hi = piece_span(info.nbytes, k)
            out.append(PieceRef(index[name], k, hi - lo))
    return sorted(out, key=lambda r: (r.tensor, r.piece))


def assign(pieces: Sequence[PieceRef], sources: Sequence[str]) -> dict[str, list[PieceRef]]:
    """Stripe ``pieces`` over ``sources``: each piece, in order, goes to the
    source with the fewest bytes so far (the first such in ``sources``), which
    is round-robin for equal pieces and balances bytes for unequal ones."""
    if not sources:
        raise ValueError("no sources to assign pieces to")
    load = dict.fromkeys(sources, 0)
    out: dict[str, list[PieceRef]] = {s: [] for s in sources}
    for ref in pieces:
        src = min(sources, key=lambda s: load[s])
        out[src].append(ref)
        load[src] += ref.nbytes
    return {s: refs for s, refs in out.items() if refs}
