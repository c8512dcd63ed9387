"""SparseLoCo's wire format: chunked top-k, 12-bit indices, 2-bit values.

Chunking (our documented choice): each parameter's flat segment is cut into
contiguous chunks of ``C = min(chunk, numel)`` elements (the last one padded)
and the ``k = round(density * C)`` entries of largest magnitude are kept per
chunk. Indices are chunk-local, packed two per 3 bytes (so ``C <= 4096``).
Kept values are quantised per parameter with templar's statistical 2-bit
quantiser: ``shift = mean``, ``scale = 6 * std / 4``, code = bin, and the
decoded value is the mean of the originals in that bin plus the shift; the
4-entry lookup and the shift travel as 5 fp32 in front. With ``bits=None``
values travel as fp32 (used for the 100%-density equivalence check).

``decode`` is the only door for peers' bytes: a payload of the wrong size,
an out-of-range index or a non-finite number raises ``ProtocolError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from peerd.errors import ConfigError, ProtocolError

MAX_CHUNK = 4096  # 12-bit indices
BINS = 4
RANGE_SIGMAS = 6.0


@dataclass(frozen=True)
class Layout:
    """Where one parameter sits in the flat vector and how it is chunked."""

    start: int
    numel: int
    chunk: int
    k: int

    @property
    def n_chunks(self) -> int:
        return -(-self.numel // self.chunk)

    @property
    def count(self) -> int:
        return self.n_chunks * self.k


def plan(segments: Sequence[tuple[int, int]], chunk: int, density: float) -> list[Layout]:
    if not 0 < chunk <= MAX_CHUNK:
        raise ConfigError(f"chunk must be in 1..{MAX_CHUNK} for 12-bit indices")
    if not 0 < density <= 1:
        raise ConfigError("density must be in (0, 1]")
    out = []
    for a, b in segments:
        c = min(chunk, b - a)
        out.append(Layout(a, b - a, c, max(1, min(c, round(density * c)))))
    return out


def pack12(idx: np.ndarray) -> np.ndarray:
    v = idx.astype(np.uint32)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint32)])
    a, b = v[0::2], v[1::2]
    out = np.empty((a.size, 3), np.uint8)
    out[:, 0] = a & 0xFF
    out[:, 1] = ((a >> 8) & 0x0F) | ((b & 0x0F) << 4)
    out[:, 2] = b >> 4
    return out.reshape(-1)


def unpack12(raw: np.ndarray, n: int) -> np.ndarray:
    t = raw.reshape(-1, 3).astype(np.int64)
    out = np.empty(t.shape[0] * 2, np.int64)
    out[0::2] = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
    out[1::2] = (t[:, 1] >> 4) | (t[:, 2] << 4)
    return out[:n]


def pack2(codes: np.ndarray) -> np.ndarray:
    pad = (-codes.size) % 4
    c = np.concatenate([codes.astype(np.uint8), np.zeros(pad, np.uint8)]).reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8)


def unpack2(raw: np.ndarray, n: int) -> np.ndarray:
    return np.stack([(raw >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:n]


def quantize2(v: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """2-bit codes and the 5-float header (lookup[0..3], shift)."""
    shift = v.mean()
    centred = v - shift
    sigma = centred.norm() / max(1, v.numel() - 1) ** 0.5
    scale = RANGE_SIGMAS * sigma / BINS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(centred / scale + BINS / 2).clamp(0, BINS - 1).to(torch.int64)
    counts = torch.bincount(codes, minlength=BINS).float()
    sums = torch.zeros(BINS).index_add_(0, codes, centred)
    lookup = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros(()))
    return codes.numpy().astype(np.uint8), torch.cat([lookup, shift.reshape(1)])


def payload_size(layouts: Sequence[Layout], bits: int | None) -> int:
    total = 0
    for lay in layouts:
        total += 3 * (-(-lay.count // 2))
        total += 20 + -(-lay.count // 4) if bits == 2 else 4 * lay.count
    return total


def encode(e: torch.Tensor, layouts: Sequence[Layout], bits: int | None) -> np.ndarray:
    """Top-k of ``|e|`` per chunk, encoded; ``e`` is the flat fp32 accumulator."""
    parts: list[np.ndarray] = []
    for lay in layouts:
        seg = e[lay.start : lay.start + lay.numel]
        padded = torch.zeros(lay.n_chunks * lay.chunk)
        padded[: lay.numel] = seg
        mag = padded.abs()
        mag[lay.numel :] = -1.0  # padding is picked only when a short tail has fewer than k
        idx = mag.view(lay.n_chunks, lay.chunk).topk(lay.k, dim=1, sorted=False).indices
        vals = padded.view(lay.n_chunks, lay.chunk).gather(1, idx).reshape(-1)
        parts.append(pack12(idx.reshape(-1).numpy()))
        if bits == 2:
            codes, header = quantize2(vals)
            parts.append(header.numpy().astype(np.float32).view(np.uint8))
            parts.append(pack2(codes))
        else:
            parts.append(vals.numpy().astype(np.float32).view(np.uint8))
    return np.concatenate(parts)


def decode(
    raw: np.ndarray, layouts: Sequence[Layout], bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global indices, values) of one payload; padding entries are dropped."""
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != payload_size(layouts, bits):
        raise ProtocolError("sparse payload has the wrong type or size")
    all_idx: list[np.ndarray] = []
    all_val: list[np.ndarray] = []
    pos = 0
    for lay in layouts:
        nidx = 3 * (-(-lay.count // 2))
        local = unpack12(raw[pos : pos + nidx], lay.count)
        pos += nidx
        if bits == 2:
            header = raw[pos : pos + 20].copy().view(np.float32)
            pos += 20
            ncode = -(-lay.count // 4)
            codes = unpack2(raw[pos : pos + ncode], lay.count)
            pos += ncode
            vals = header[codes.astype(np.int64)] + header[4]
        else:
            vals = raw[pos : pos + 4 * lay.count].copy().view(np.float32)
            pos += 4 * lay.count
        if local.max(initial=0) >= lay.chunk or not np.isfinite(vals).all():
            raise ProtocolError("sparse payload has an out-of-range index or a bad value")
        flat = local + np.repeat(np.arange(lay.n_chunks) * lay.chunk, lay.k)
        keep = flat < lay.numel
        all_idx.append(flat[keep] + lay.start)
        all_val.append(vals[keep].astype(np.float32))
    return torch.from_numpy(np.concatenate(all_idx)), torch.from_numpy(np.concatenate(all_val))
