"""Flat access to the caller's numpy arrays and torch CPU tensors.

The engine reduces a flat 1-D view that shares memory with the caller's
array, so writing the result back is a copy into that memory, never a new
object; with a separate destination (``out``) the ring writes the result
straight into the destination's memory and the input is only read.

bf16 has no numpy dtype: its bits are handled as ``uint16`` and
converted to and from fp32 here (round to nearest even, NaN kept NaN), which
matches torch bit for bit on every non-NaN value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from collectives.chunking import Span
from peerd.errors import ConfigError


class Kind(enum.Enum):
    F32 = "float32"
    F16 = "float16"
    BF16 = "bfloat16"

    @property
    def itemsize(self) -> int:
        return 4 if self is Kind.F32 else 2

    @property
    def storage(self) -> np.dtype[Any]:
        """The numpy dtype holding this kind's bits."""
        return np.dtype({Kind.F32: np.float32, Kind.F16: np.float16, Kind.BF16: np.uint16}[self])


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    bits = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return bits


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(frozen=True, eq=False)
class Flat:
    """A flat view of the caller's memory plus its element kind."""

    data: np.ndarray  # 1-D, shares memory with the caller's array
    kind: Kind

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def fp32(self, span: Span) -> np.ndarray:
        """Elements of ``span`` as fp32: a view for fp32 input, else a converted copy."""
        part = self.data[span.lo : span.hi]
        if self.kind is Kind.F32:
            return part
        if self.kind is Kind.F16:
            return part.astype(np.float32)
        return bf16_bits_to_f32(part)

    def store(self, span: Span, values: np.ndarray) -> None:
        """Write fp32 ``values`` into ``span``, converting to this kind."""
        part = self.data[span.lo : span.hi]
        if self.kind is Kind.BF16:
            part[...] = f32_to_bf16_bits(values)
        else:
            np.copyto(part, values, casting="unsafe")


_TORCH_KINDS = {"torch.float32": Kind.F32, "torch.float16": Kind.F16, "torch.bfloat16": Kind.BF16}
_NUMPY_KINDS = {np.dtype(np.float32): Kind.F32, np.dtype(np.float16): Kind.F16}


def flatten(array: Any, *, written: bool = True) -> Flat:
    """A ``Flat`` sharing memory with ``array`` (numpy array or torch CPU tensor).

    Raises ``ConfigError`` for anything that cannot be reduced: other dtypes,
    non-contiguous memory, tensors off the CPU, and read-only memory where the
    result is to be ``written``.
    """
    if isinstance(array, Flat | np.ndarray):
        if isinstance(array, Flat):  # its kind named by the caller: bfloat16 bits in shared memory
            flat = array
        else:
            kind = _NUMPY_KINDS.get(array.dtype)
            if kind is None:
                raise _unsupported(array.dtype)
            if not array.flags.c_contiguous:
                raise ConfigError("all_reduce reduces in place: pass a C-contiguous array")
            flat = Flat(array.reshape(-1), kind)
        if written and not flat.data.flags.writeable:
            raise ConfigError("all_reduce writes the result into the array, which is "
                              "read-only: pass a writable array (or a writable out=)")
        return flat
    mod = type(array).__module__
    if mod.startswith("torch"):
        kind = _TORCH_KINDS.get(str(array.dtype))
        if kind is None:
            raise _unsupported(array.dtype)
        if array.device.type != "cpu":
            raise ConfigError("all_reduce needs CPU tensors; copy the tensor to CPU first")
        if not array.is_contiguous():
            raise ConfigError("all_reduce reduces in place: pass a contiguous tensor")
        flat = array.detach().reshape(-1)
        if kind is Kind.BF16:
            import torch

            return Flat(flat.view(torch.int16).numpy().view(np.uint16), kind)
        return Flat(flat.numpy(), kind)
    raise ConfigError(f"all_reduce takes numpy arrays or torch tensors, not {type(array).__name__}")


def _unsupported(dtype: Any) -> ConfigError:
    return ConfigError(f"all_reduce needs float32, float16 or bfloat16 elements, got {dtype}: "
                       "convert it first (e.g. tensor.float())")


def destination(flat: Flat, out: Any) -> Flat:
    """Where the result of reducing ``flat`` goes: ``out`` (numpy array or torch
    CPU tensor) as a ``Flat``, checked to take it; ``flat`` itself when ``out``
    is None or is the input's own memory (in place).

    Raises ``ConfigError`` when ``out`` differs from the input in element count
    or kind, or overlaps the input without being it: the ring reads the input
    while it writes the destination, so a partial overlap would feed results
    back into the sum.
    """
    if out is None:
        return flat
    dest = flatten(out)
    if dest.kind is not flat.kind or dest.size != flat.size:
        raise out_mismatch(dest.size, dest.kind.value, flat.size, flat.kind.value)
    if _span(dest.data) == _span(flat.data):
        return flat
    if np.shares_memory(dest.data, flat.data):
        raise out_overlaps()
    return dest


# Also raised by the daemon's client, which checks ``out=`` on arrays of any
# strides before staging them (``peerd.client.arrays.check_out``).
def out_mismatch(out_size: int, out_kind: str, size: int, kind: str) -> ConfigError:
    return ConfigError(f"out holds {out_size} {out_kind} elements but the input {size} "
                       f"{kind}: pass an out of the input's size and dtype")


def out_overlaps() -> ConfigError:
    return ConfigError("out overlaps the input without being it: pass separate "
                       "memory, or the input itself (or no out) to reduce in place")


def _span(a: np.ndarray) -> tuple[int, int]:
    start = int(a.__array_interface__["data"][0])
    return start, start + int(a.nbytes)
