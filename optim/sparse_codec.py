"""SparseLoCo's wire format: chunked top-k, Rice-coded index sets, 2-bit values.

Chunking (our documented choice): each parameter's flat segment is cut into
contiguous chunks of ``C = min(chunk, numel)`` elements and the ``k =
round(density * C)`` entries of largest magnitude are kept per chunk (a
shorter last chunk keeps ``min(k, its size)``). Each chunk's kept indices are
sorted and Rice-coded as gaps (``optim/rice.py``) with one Rice parameter per
parameter tensor, chosen by the sender to minimise the length: ~61 bytes per
4096-element chunk at k=64 where 12-bit fields took 96. Values travel in the
sorted-index order. They are quantised per parameter with templar's
statistical 2-bit quantiser (``shift = mean``, ``scale = 6 * std / 4``, code =
bin); the decoded value of a code is the mean of the originals in its bin plus
the shift, and those 4 decoded values travel as bfloat16 (their rounding is
far below the 2-bit error, and the sender feeds back exactly what peers decode).
A tensor that sends at most 4 values sends them as bfloat16 instead, no codes.
With ``bits=None`` values travel as fp32 (the 100%-density equivalence check).

Payload (byte-aligned parts, then two bit streams):
  Rice parameter per parameter tensor      1 byte each
  decoded-value table per tensor           min(count, 4) x bf16 (bits=2) | count x fp32
  fixed-width bits: per tensor, the low r bits of every gap, then 2-bit codes (if count > 4)
  unary stream: every gap's quotient, all tensors end to end
Sizes vary with the index sets; the all-gather carries arrays of any size.

``decode`` is the only door for peers' bytes: a payload that is oversized,
truncated, has trailing bytes or non-zero padding, an index outside its
chunk, or a non-finite value raises ``ProtocolError``. Gap coding cannot
express a duplicate or unsorted index.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from optim import rice
from peerd.errors import ConfigError, ProtocolError

MAX_CHUNK = 1 << rice.MAX_PARAM
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
    def n_full(self) -> int:
        return self.numel // self.chunk

    @property
    def tail(self) -> int:
        """Size of a last, shorter chunk (0 if the chunks tile the parameter)."""
        return self.numel - self.n_full * self.chunk

    @property
    def n_chunks(self) -> int:
        return self.n_full + (self.tail > 0)

    @property
    def count(self) -> int:
        return self.n_full * self.k + min(self.k, self.tail)

    def sizes(self) -> np.ndarray:
        full = np.full(self.n_full, self.chunk, np.int64)
        return np.append(full, self.tail) if self.tail else full

    def ks(self) -> np.ndarray:
        return np.minimum(self.sizes(), self.k)


def plan(segments: Sequence[tuple[int, int]], chunk: int, density: float) -> list[Layout]:
    if not 0 < chunk <= MAX_CHUNK:
        raise ConfigError(f"chunk must be in 1..{MAX_CHUNK}")
    if not 0 < density <= 1:
        raise ConfigError("density must be in (0, 1]")
    out = []
    for a, b in segments:
        c = min(chunk, b - a)
        out.append(Layout(a, b - a, c, max(1, min(c, round(density * c)))))
    return out


def quantize2(v: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """2-bit codes and the 5 floats (lookup[0..3], shift); code j decodes to
    lookup[j] + shift."""
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


def _bf16_bytes(table: torch.Tensor) -> np.ndarray:
    return table.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").view(np.uint8)


def _bf16_floats(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _code_bits(lay: Layout, bits: int | None) -> int:
    """2-bit codes, except where a tensor sends at most 4 values: those travel
    as bf16 themselves (the table *is* the values), which saves the codes and
    most of the table on the small tensors (norm weights, biases)."""
    return 2 if bits == 2 and lay.count > BINS else 0


def _front_size(lay: Layout, bits: int | None) -> int:
    return 2 * min(lay.count, BINS) if bits == 2 else 4 * lay.count


def _header_size(layouts: Sequence[Layout], bits: int | None) -> int:
    return len(layouts) + sum(_front_size(lay, bits) for lay in layouts)


def max_payload_size(layouts: Sequence[Layout], bits: int | None) -> int:
    """An upper bound on any valid payload's size (widest low bits, longest unary)."""
    return _size_bounds(tuple(layouts), bits)[1]


@functools.lru_cache(maxsize=64)
def _size_bounds(layouts: tuple[Layout, ...], bits: int | None) -> tuple[int, int]:
    """(header size, max payload size): ``decode`` checks every peer's payload
    against them, so they are worked out once per layout."""
    fixed = sum(lay.count * (rice.MAX_PARAM + _code_bits(lay, bits)) for lay in layouts)
    unary = sum(lay.count + int((lay.sizes() - lay.ks()).sum()) for lay in layouts)
    head = _header_size(layouts, bits)
    return head, head + -(-fixed // 8) + -(-unary // 8)


def _select(mag: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row of ``mag``, ascending.
    A partition finds each row's k-th largest value and a mask keeps what is
    at or above it (several times faster than torch's topk here, and the
    mask's nonzero positions come out sorted); rows where ties or NaNs break
    the count of k are redone with topk."""
    rows, n = mag.shape
    floor = np.partition(mag, n - k, axis=1)[:, n - k, None]
    keep = mag >= floor
    odd = np.flatnonzero(keep.sum(axis=1) != k)
    if odd.size:
        redo = torch.from_numpy(mag[odd]).topk(k, dim=1).indices.numpy()
        keep[odd] = False
        keep[odd[:, None], redo] = True
    return np.nonzero(keep)[1].reshape(rows, k)


def _top_k(seg: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Chunk-local indices (ascending within each chunk) and their values."""
    idx: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    if lay.n_full:
        rows = seg[: lay.n_full * lay.chunk].reshape(lay.n_full, lay.chunk)
        pick = _select(np.abs(rows), lay.k)
        idx.append(pick.reshape(-1))
        vals.append(np.take_along_axis(rows, pick, axis=1).reshape(-1))
    if lay.tail:
        rest = seg[lay.n_full * lay.chunk :].reshape(1, -1)
        pick = _select(np.abs(rest), min(lay.k, lay.tail))
        idx.append(pick.reshape(-1))
        vals.append(rest[0, pick[0]])
    return np.concatenate(idx), np.concatenate(vals)


def encode(e: torch.Tensor, layouts: Sequence[Layout], bits: int | None) -> np.ndarray:
    """Top-k of ``|e|`` per chunk, encoded; ``e`` is the flat fp32 accumulator.
    ``ValueError`` if a picked value is not finite (the run has diverged)."""
    params: list[int] = []
    front: list[np.ndarray] = []
    fixed: list[np.ndarray] = []
    unary: list[np.ndarray] = []
    flat = e.detach().to(torch.float32).contiguous().numpy()
    for lay in layouts:
        local, vals = _top_k(flat[lay.start : lay.start + lay.numel], lay)
        if not np.isfinite(vals).all():  # NaN/inf training; peers would refuse it anyway
            raise ValueError("non-finite values among the top-k of the accumulator")
        gaps = rice.to_gaps(local, lay.ks())
        r = rice.best_param(gaps)
        params.append(r)
        fixed.append(rice.fixed_bits(gaps & ((1 << r) - 1), r))
        unary.append(rice.unary_bits(gaps >> r))
        if _code_bits(lay, bits):
            codes, header = quantize2(torch.from_numpy(vals))
            front.append(_bf16_bytes(header[:BINS] + header[BINS]))
            fixed.append(rice.fixed_bits(codes, 2))
        elif bits == 2:
            front.append(_bf16_bytes(torch.from_numpy(vals)))
        else:
            front.append(vals.astype("<f4").view(np.uint8))
    return np.concatenate([np.array(params, np.uint8), *front,
                           rice.pack(np.concatenate(fixed)), rice.pack(np.concatenate(unary))])


def decode(
    raw: np.ndarray, layouts: Sequence[Layout], bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global indices, values) of one payload, indices ascending per chunk."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ProtocolError("sparse payload must be a flat uint8 array")
    head, most = _size_bounds(tuple(layouts), bits)
    if not head < raw.size <= most:
        raise ProtocolError(f"sparse payload size {raw.size} out of range")
    n = len(layouts)
    params = raw[:n].astype(np.int64)
    if (params > rice.MAX_PARAM).any():
        raise ProtocolError("sparse payload: Rice parameter out of range")
    counts = np.array([lay.count for lay in layouts], np.int64)
    front = raw[n:head].copy()
    floats = _bf16_floats(front) if bits == 2 else front.view("<f4").astype(np.float32)
    if not np.isfinite(floats).all():
        raise ProtocolError("sparse payload: non-finite value")
    code_bits = np.array([_code_bits(lay, bits) for lay in layouts], np.int64)
    nfixed = int((counts * (params + code_bits)).sum())
    fixed_end = head + -(-nfixed // 8)
    if fixed_end >= raw.size:
        raise ProtocolError("sparse payload truncated")
    fixed = rice.unpack(raw[head:fixed_end], nfixed)
    quotients = rice.read_unary(raw[fixed_end:], int(counts.sum()))
    all_idx: list[np.ndarray] = []
    all_val: list[np.ndarray] = []
    pos = used = table = 0
    for j, lay in enumerate(layouts):
        r, c = int(params[j]), lay.count
        low = rice.read_fixed(fixed[pos : pos + c * r], c, r)
        pos += c * r
        gaps = (quotients[used : used + c] << r) | low
        ks = lay.ks()
        local = rice.from_gaps(gaps, ks)
        if (local >= np.repeat(lay.sizes(), ks)).any():
            raise ProtocolError("sparse payload: index outside its chunk")
        all_idx.append(local + np.repeat(np.arange(lay.n_chunks) * lay.chunk + lay.start, ks))
        if code_bits[j]:
            codes = rice.read_fixed(fixed[pos : pos + 2 * c], c, 2)
            pos += 2 * c
            all_val.append(floats[table : table + BINS][codes])
            table += BINS
        elif bits == 2:
            all_val.append(floats[table : table + c])
            table += c
        else:
            all_val.append(floats[used : used + c])
        used += c
    return (torch.from_numpy(np.concatenate(all_idx)),
            torch.from_numpy(np.concatenate(all_val).astype(np.float32)))
