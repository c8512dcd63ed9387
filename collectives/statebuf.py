"""Byte views of the caller's named tensors, and their piece hashes.

State sync serves and installs tensors in place: ``capture`` wraps each numpy
array or torch CPU tensor in a flat ``uint8`` view of its own memory (no
copy), so holders send straight from the training state and downloaders
write verified pieces straight into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from collectives.state import (
    ITEMSIZE,
    TensorInfo,
    hash_piece,
    piece_count,
    piece_span,
    tensor_digest,
)
from peerd.errors import ConfigError


@dataclass(frozen=True, eq=False)
class RawTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # 1-D uint8, shares memory with the caller's tensor

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    @property
    def writable(self) -> bool:
        return bool(self.data.flags.writeable)

    def piece(self, index: int) -> memoryview:
        lo, hi = piece_span(self.nbytes, index)
        return memoryview(self.data[lo:hi])  # type: ignore[arg-type]

    def install(self, index: int, payload: bytes | memoryview) -> None:
        lo, hi = piece_span(self.nbytes, index)
        self.data[lo:hi] = np.frombuffer(payload, dtype=np.uint8)


def raw_view(name: str, value: Any) -> RawTensor:
    """A ``RawTensor`` sharing memory with ``value``; ``ConfigError`` if impossible."""
    if isinstance(value, np.ndarray):
        if value.dtype.name not in ITEMSIZE or not value.dtype.isnative:
            raise ConfigError(f"state tensor {name!r}: unsupported dtype {value.dtype}")
        if not value.flags.c_contiguous:
            raise ConfigError(f"state tensor {name!r} must be C-contiguous (synced in place)")
        flat = value.reshape(-1).view(np.uint8)
        return RawTensor(name, value.dtype.name, tuple(int(d) for d in value.shape), flat)
    if type(value).__module__.startswith("torch"):
        import torch

        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in ITEMSIZE:
            raise ConfigError(f"state tensor {name!r}: unsupported dtype {value.dtype}")
        if value.device.type != "cpu" or not value.is_contiguous():
            raise ConfigError(f"state tensor {name!r} must be a contiguous CPU tensor")
        flat_t = value.detach().reshape(-1)
        if flat_t.numel() == 0:
            data = np.zeros(0, dtype=np.uint8)
        else:
            data = flat_t.view(torch.uint8).numpy()
        return RawTensor(name, dtype, tuple(int(d) for d in value.shape), data)
    raise ConfigError(
        f"state tensor {name!r}: numpy arrays or torch tensors only, not {type(value).__name__}"
    )


def capture(state: Mapping[str, Any]) -> dict[str, RawTensor]:
    if not all(isinstance(k, str) and k for k in state):
        raise ConfigError("shared state names must be non-empty strings")
    return {name: raw_view(name, value) for name, value in state.items()}


def describe(raw: RawTensor) -> TensorInfo:
    """Hash ``raw`` piece by piece (CPU-bound: BLAKE3 at several GB/s)."""
    pieces = tuple(hash_piece(raw.piece(k)) for k in range(piece_count(raw.nbytes)))
    return TensorInfo(
        raw.dtype, raw.shape, raw.nbytes, pieces,
        tensor_digest(raw.dtype, raw.shape, raw.nbytes, pieces),
    )
