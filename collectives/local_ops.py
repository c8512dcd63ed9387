"""Pure helpers behind ``LocalGroup``: reduction in a fixed order, simulated wire
quantization, byte accounting and the popular-state rule of shared-state sync."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import torch

from collectives.api import Quant, ReduceOp, SyncStrategy

_WIRE_BYTES = {Quant.NONE: 4.0, Quant.FP16: 2.0, Quant.BF16: 2.0, Quant.INT8: 1.0}


def to_numpy(array: Any) -> np.ndarray:
    """A numpy view (torch CPU tensor) or the array itself."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def write_back(dest: Any, value: np.ndarray) -> None:
    """Overwrite ``dest`` (torch tensor or numpy array) in place with ``value``."""
    if isinstance(dest, torch.Tensor):
        with torch.no_grad():
            dest.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(dest.shape))
    else:
        dest[...] = value.reshape(dest.shape)


def quantize_roundtrip(x: np.ndarray, quant: Quant) -> np.ndarray:
    """What the peers would decode from ``x`` sent with ``quant`` (a fresh fp32 array)."""
    if quant == Quant.NONE:
        return x.astype(np.float32, copy=True)
    if quant == Quant.FP16:
        return x.astype(np.float16).astype(np.float32)
    if quant == Quant.BF16:
        return torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    step = (hi - lo) / 255.0 if hi > lo else 1.0
    codes = np.clip(np.rint((x - lo) / step), 0, 255)
    return (codes * step + lo).astype(np.float32)


def reduce_in_order(arrays: list[np.ndarray], op: ReduceOp) -> np.ndarray:
    """fp32 sum in the given (view) order, divided by the count for AVG."""
    acc = arrays[0].astype(np.float32, copy=True)
    for a in arrays[1:]:
        acc += a
    if op == ReduceOp.AVG and len(arrays) > 1:
        acc /= np.float32(len(arrays))
    return acc


def ring_bytes(n: int, elements: int, quant: Quant) -> int:
    """Bytes one member sends (and receives) in a ring all-reduce: 2(n-1)/n * N * b."""
    if n <= 1:
        return 0
    return round(2 * (n - 1) / n * elements * _WIRE_BYTES[quant])


@dataclass(frozen=True)
class LocalArrays:
    """A snapshot of a named state: copies of the arrays and their hashes."""

    arrays: Mapping[str, np.ndarray]
    hashes: Mapping[str, bytes]

    @staticmethod
    def capture(state: Mapping[str, Any]) -> LocalArrays:
        arrays = {k: np.ascontiguousarray(to_numpy(v)).copy() for k, v in state.items()}
        return LocalArrays(arrays, {k: tensor_hash(a) for k, a in arrays.items()})


def tensor_hash(a: np.ndarray) -> bytes:
    h = blake3.blake3()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.digest()


def state_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Content hash of a whole named state, in name-sorted order."""
    h = blake3.blake3()
    for key in sorted(arrays):
        h.update(key.encode() + b"\0")
        h.update(tensor_hash(arrays[key]))
    return h.digest()


def popular_state(
    contributions: Mapping[str, tuple[int, SyncStrategy, LocalArrays, bytes]],
) -> tuple[LocalArrays | None, list[str]]:
    """The winning state and who holds it (in the given order).

    Votes come from members not in RECEIVE_ONLY mode and are grouped by
    (revision, digest). Most votes wins; ties go to the higher revision, then
    to the smaller digest, so every member picks the same state.
    """
    votes: dict[tuple[int, bytes], list[str]] = {}
    for name, (revision, strategy, _, digest) in contributions.items():
        if strategy != SyncStrategy.RECEIVE_ONLY:
            votes.setdefault((revision, digest), []).append(name)
    if not votes:
        return None, []
    key = min(votes, key=lambda k: (-len(votes[k]), -k[0], k[1]))
    holders = votes[key]
    return contributions[holders[0]][2], holders
