"""Wire codecs for all-reduce payloads: raw fp32/fp16/bf16 and int8 min-max.

A codec turns an fp32 block (one sub-chunk) into wire bytes and back. Sums
are always accumulated in fp32: a hop decodes the partial it received, adds
its own fp32 input and re-encodes. The chunk owner encodes the final value
once; everyone, the owner included, decodes those same bytes, so every peer
ends with identical results. All operations are elementwise IEEE arithmetic
in fixed order, hence deterministic.

int8 block layout: ``<f32 min><f32 scale><u8 codes...>`` with
``value = min + code * scale`` and ``scale = (max - min) / 255``: the error of
one quantization is at most ``scale / 2`` per element. A block containing a
non-finite value decodes to NaN everywhere (it cannot be represented).
"""

from __future__ import annotations

import struct

import numpy as np

from collectives.api import Quant
from collectives.arrays import Flat, Kind, bf16_bits_to_f32, f32_to_bf16_bits
from collectives.chunking import Span

_INT8_HEADER = struct.Struct("<ff")


class Codec:
    """Base codec; subclasses define the wire format of one block."""

    quant: Quant

    def wire_size(self, n: int) -> int:
        raise NotImplementedError

    def encode(self, x: np.ndarray, out: memoryview) -> None:
        """Write the encoding of fp32 ``x`` into ``out`` (exactly ``wire_size`` bytes)."""
        raise NotImplementedError

    def decode(self, buf: bytes | memoryview, n: int) -> np.ndarray:
        """A fresh, writable fp32 array of the ``n`` values encoded in ``buf``."""
        raise NotImplementedError

    def check(self, buf: bytes | memoryview, n: int) -> None:
        if len(buf) != self.wire_size(n):
            raise ValueError(f"block of {len(buf)} bytes, expected {self.wire_size(n)}")

    def encode_input(self, flat: Flat, span: Span) -> bytes | memoryview:
        """Wire bytes of the caller's own elements (zero-copy when formats match)."""
        out = bytearray(self.wire_size(span.size))
        self.encode(flat.fp32(span), memoryview(out))
        return memoryview(out)

    def decode_into(self, buf: bytes | memoryview, flat: Flat, span: Span) -> None:
        """Write the decoded block into the caller's memory."""
        flat.store(span, self.decode(buf, span.size))

    def accumulate(self, block: memoryview, flat: Flat, span: Span, divisor: int = 1) -> None:
        """Add the caller's elements of ``span`` to the partial encoded in
        ``block`` (in fp32), divide by ``divisor`` unless it is 1, and write the
        encoding of the result back into ``block``."""
        acc = self.decode(block, span.size)
        np.add(acc, flat.fp32(span), out=acc)
        if divisor != 1:
            np.divide(acc, np.float32(divisor), out=acc)
        self.encode(acc, block)


class RawCodec(Codec):
    """Plain floating point of one kind on the wire."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.quant = {Kind.F32: Quant.NONE, Kind.F16: Quant.FP16, Kind.BF16: Quant.BF16}[kind]

    def wire_size(self, n: int) -> int:
        return n * self.kind.itemsize

    def encode(self, x: np.ndarray, out: memoryview) -> None:
        dst = np.frombuffer(out, dtype=self.kind.storage, count=x.size)
        if self.kind is Kind.BF16:
            dst[...] = f32_to_bf16_bits(x)
        else:
            np.copyto(dst, x, casting="unsafe")

    def decode(self, buf: bytes | memoryview, n: int) -> np.ndarray:
        self.check(buf, n)
        src = np.frombuffer(buf, dtype=self.kind.storage, count=n)
        if self.kind is Kind.BF16:
            return bf16_bits_to_f32(src)
        return src.astype(np.float32)  # always a copy: the result is added into

    def encode_input(self, flat: Flat, span: Span) -> bytes | memoryview:
        if flat.kind is self.kind:
            return memoryview(flat.data[span.lo : span.hi]).cast("B")  # type: ignore[arg-type]
        return super().encode_input(flat, span)

    def decode_into(self, buf: bytes | memoryview, flat: Flat, span: Span) -> None:
        if flat.kind is self.kind:
            self.check(buf, span.size)
            np.copyto(flat.data[span.lo : span.hi], np.frombuffer(buf, dtype=self.kind.storage))
        else:
            super().decode_into(buf, flat, span)

    def accumulate(self, block: memoryview, flat: Flat, span: Span, divisor: int = 1) -> None:
        if self.kind is Kind.F32 and flat.kind is Kind.F32:
            # fp32 on the wire is fp32 in memory: add in place, same IEEE
            # operations as decode/add/encode, without the two copies.
            self.check(block, span.size)
            acc = np.frombuffer(block, dtype=np.float32, count=span.size)
            np.add(acc, flat.data[span.lo : span.hi], out=acc)
            if divisor != 1:
                np.divide(acc, np.float32(divisor), out=acc)
        else:
            super().accumulate(block, flat, span, divisor)


class Int8Codec(Codec):
    """Per-block min-max int8."""

    quant = Quant.INT8

    def wire_size(self, n: int) -> int:
        return _INT8_HEADER.size + n

    def encode(self, x: np.ndarray, out: memoryview) -> None:
        if x.size == 0:
            _INT8_HEADER.pack_into(out, 0, 0.0, 0.0)
            return
        lo, hi = np.float32(x.min()), np.float32(x.max())
        codes = np.frombuffer(out, dtype=np.uint8, offset=_INT8_HEADER.size, count=x.size)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            _INT8_HEADER.pack_into(out, 0, float("nan"), 0.0)
            codes[...] = 0
            return
        scale = np.float32((hi - lo) / np.float32(255.0))
        _INT8_HEADER.pack_into(out, 0, float(lo), float(scale))
        if scale == 0 or not np.isfinite(scale):
            codes[...] = 0
            return
        q = np.subtract(x, lo, dtype=np.float32)
        np.divide(q, scale, out=q)
        np.rint(q, out=q)
        np.clip(q, 0, 255, out=q)
        codes[...] = q.astype(np.uint8)

    def decode(self, buf: bytes | memoryview, n: int) -> np.ndarray:
        self.check(buf, n)
        lo, scale = _INT8_HEADER.unpack_from(buf, 0)
        out = np.frombuffer(buf, dtype=np.uint8, offset=_INT8_HEADER.size, count=n).astype(
            np.float32
        )
        np.multiply(out, np.float32(scale), out=out)
        np.add(out, np.float32(lo), out=out)
        return out


def codec_for(quant: Quant, kind: Kind) -> Codec:
    """The codec for ``quant``; ``Quant.NONE`` keeps the array's own format on the wire."""
    if quant is Quant.NONE:
        return RawCodec(kind)
    if quant is Quant.FP16:
        return RawCodec(Kind.F16)
    if quant is Quant.BF16:
        return RawCodec(Kind.BF16)
    if quant is Quant.INT8:
        return Int8Codec()
    raise ValueError(f"unknown quantization {quant!r}")
