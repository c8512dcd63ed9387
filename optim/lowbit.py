"""4-bit E3M0 encoding of outer gradients (Streaming DiLoCo) as a self-describing
byte payload, plus nibble packing.

E3M0 here (our definition, per docs/optimizers.md §2.5): per block of
``BLOCK`` elements, ``scale = max|x|``; each element is ``sign * 2**e * scale``
with ``e`` in -6..0 stored as code ``e + 7`` (1..7) in 3 bits, and code 0
meaning zero, used when ``|x| / scale < 2**-6.5``. One sign bit makes 4 bits
per element; a payload is the fp32 block scales followed by the packed nibbles.
Decoding accepts only a payload of exactly the expected size with finite,
non-negative scales; anything else raises ``ProtocolError``.
"""

from __future__ import annotations

import numpy as np
import torch

from peerd.errors import ProtocolError

BLOCK = 256
MIN_EXP = -6


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def payload_size(n: int) -> int:
    """Bytes of the payload for ``n`` elements."""
    return 4 * _blocks(n) + (n + 1) // 2


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes < 16 -> two per byte (first in the low nibble)."""
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


def e3m0_encode(x: torch.Tensor) -> np.ndarray:
    """Encode a flat fp32 tensor into a uint8 payload."""
    n = x.numel()
    nb = _blocks(n)
    padded = torch.zeros(nb * BLOCK, dtype=torch.float32)
    padded[:n] = x.reshape(-1)
    blocks = padded.view(nb, BLOCK)
    scale = blocks.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    ratio = blocks.abs() / safe[:, None]
    exp = torch.round(torch.log2(ratio.clamp_min(2.0**-30))).clamp(MIN_EXP, 0)
    code = (exp - MIN_EXP + 1).to(torch.uint8)
    code[ratio < 2.0 ** (MIN_EXP - 0.5)] = 0
    sign = (blocks < 0).to(torch.uint8) << 3
    nibbles = (code | sign).reshape(-1)[:n].numpy()
    return np.concatenate([scale.numpy().view(np.uint8), pack_nibbles(nibbles)])


def e3m0_decode(payload: np.ndarray, n: int) -> torch.Tensor:
    """Decode a payload of ``n`` elements (``ProtocolError`` if malformed)."""
    if payload.dtype != np.uint8 or payload.ndim != 1 or payload.size != payload_size(n):
        raise ProtocolError("E3M0 payload has the wrong type or size")
    nb = _blocks(n)
    scale = torch.from_numpy(payload[: 4 * nb].copy().view(np.float32))
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ProtocolError("E3M0 payload has a bad block scale")
    nib = torch.from_numpy(unpack_nibbles(payload[4 * nb :], n).astype(np.int64))
    code = nib & 0x7
    sign = 1.0 - 2.0 * (nib >> 3).float()
    mag = torch.where(code > 0, torch.exp2((code + MIN_EXP - 1).float()), torch.zeros(()))
    per_elem_scale = scale.repeat_interleave(BLOCK)[:n]
    return sign * mag * per_elem_scale
