"""Arrays on the wire for point-to-point collectives (pure: numpy and torch only).

``pack`` turns a numpy array or torch CPU tensor into a small header (dtype,
shape) and a byte view of its memory; ``unpack`` validates both and builds a
fresh array, so nothing a peer sends can make us allocate more than the
header's size (itself bounded) or misread the bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from collectives.statebuf import raw_view
from collectives.statemsg import ArrayHeader
from peerd.errors import ConfigError, ProtocolError
from peerd.wire import decode_untrusted, encode


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each of ``parts`` near-equal chunks of ``n`` elements."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def pack(array: Any) -> tuple[bytes, memoryview]:
    """Header and body bytes of ``array`` (numpy or torch CPU; no copy if contiguous)."""
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
    elif type(array).__module__.startswith("torch"):
        array = array.detach().contiguous()
    raw = raw_view("array", array)
    return encode(ArrayHeader(raw.dtype, raw.shape)), memoryview(raw.data)  # type: ignore[arg-type]


def unpack(header: bytes, body: bytes | memoryview) -> Any:
    """The array a ``pack`` made (numpy; torch for bfloat16); ``ProtocolError`` if malformed."""
    h: ArrayHeader = decode_untrusted(bytes(header), expect=ArrayHeader)
    if len(body) != h.nbytes:
        raise ProtocolError(f"array body of {len(body)} bytes, header says {h.nbytes}")
    data = bytearray(body)
    if h.dtype == "bfloat16":
        import torch

        return torch.frombuffer(data, dtype=torch.bfloat16).reshape(h.shape)
    return np.frombuffer(data, dtype=np.dtype(h.dtype)).reshape(h.shape)


def as_array(array: Any) -> Any:
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.startswith("torch"):
        if str(array.dtype) == "torch.bfloat16":
            return array.detach().contiguous()
        return array.detach().cpu().numpy()
    return np.asarray(array)


def nbytes_of(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return int(array.nbytes)
    return int(array.numel() * array.element_size())


def copy_of(array: Any) -> Any:
    return array.copy() if isinstance(array, np.ndarray) else array.clone()


def write_into(dest: Any, value: Any) -> None:
    if isinstance(dest, np.ndarray):
        src = np.asarray(value)
        if src.shape != dest.shape or src.dtype != dest.dtype:
            raise ConfigError(f"broadcast: got {src.dtype}{list(src.shape)}, "
                              f"this member has {dest.dtype}{list(dest.shape)}")
        dest[...] = src
        return
    import torch

    src_t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if src_t.shape != dest.shape or src_t.dtype != dest.dtype:
        raise ConfigError(f"broadcast: got {src_t.dtype}{list(src_t.shape)}, "
                          f"this member has {dest.dtype}{list(dest.shape)}")
    with torch.no_grad():
        dest.copy_(src_t)
