from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collectives.api import Quant
from collectives.arrays import Kind, bf16_bits_to_f32, f32_to_bf16_bits, flatten
from collectives.chunking import Span
from collectives.quant import Int8Codec, RawCodec, codec_for
from peerd.errors import ConfigError

finite = hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(-1e4, 1e4, width=32))


def roundtrip(codec, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = bytearray(codec.wire_size(x.size))
    codec.encode(x, memoryview(out))
    return codec.decode(bytes(out), x.size)


@given(finite)
@settings(max_examples=60)
def test_raw_codecs_match_reference_casts(x: np.ndarray) -> None:
    assert roundtrip(RawCodec(Kind.F32), x).tobytes() == x.tobytes()
    assert np.array_equal(roundtrip(RawCodec(Kind.F16), x), x.astype(np.float16).astype(np.float32))
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(roundtrip(RawCodec(Kind.BF16), x), want)


@given(finite)
@settings(max_examples=60)
def test_int8_error_is_within_half_a_step(x: np.ndarray) -> None:
    codec = Int8Codec()
    assert codec.wire_size(x.size) == 8 + x.size
    y = roundtrip(codec, x)
    if x.size == 0:
        return
    step = (np.float32(x.max()) - np.float32(x.min())) / np.float32(255)
    assert np.all(np.abs(y - x) <= step / 2 + 1e-3 * (np.abs(x).max() + 1) * 1e-3 + 1e-6)
    assert np.array_equal(roundtrip(codec, x), y)  # deterministic


def test_int8_constant_and_nonfinite_blocks() -> None:
    codec = Int8Codec()
    assert np.array_equal(roundtrip(codec, np.full(5, 3.5, np.float32)), np.full(5, 3.5))
    y = roundtrip(codec, np.array([1.0, np.inf, 2.0], np.float32))
    assert np.isnan(y).all()


def test_bf16_conversion_matches_torch_bits() -> None:
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 1e3
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    torch_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16_bits(x), torch_bits)
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32)))).all()


def test_codec_choice() -> None:
    assert codec_for(Quant.NONE, Kind.F16).wire_size(10) == 20
    assert codec_for(Quant.NONE, Kind.F32).wire_size(10) == 40
    assert codec_for(Quant.BF16, Kind.F32).quant is Quant.BF16
    assert codec_for(Quant.INT8, Kind.BF16).quant is Quant.INT8


def test_encode_input_is_zero_copy_when_formats_match() -> None:
    a = np.arange(8, dtype=np.float32)
    flat = flatten(a)
    view = RawCodec(Kind.F32).encode_input(flat, Span(2, 6))
    a[3] = 99.0
    assert np.frombuffer(view, np.float32)[1] == 99.0
    copy = RawCodec(Kind.F16).encode_input(flat, Span(2, 6))
    assert np.array_equal(np.frombuffer(copy, np.float16), a[2:6].astype(np.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_into_writes_the_callers_tensor(dtype: torch.dtype) -> None:
    t = torch.zeros(2, 3, dtype=dtype)
    flat = flatten(t)
    values = np.arange(6, dtype=np.float32)
    for codec in (RawCodec(Kind.F32), codec_for(Quant.NONE, flat.kind)):
        out = bytearray(codec.wire_size(6))
        codec.encode(values, memoryview(out))
        codec.decode_into(bytes(out), flat, Span(0, 6))
        assert torch.equal(t, torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype))
        t.zero_()


def test_flatten_refuses_what_cannot_be_reduced_in_place() -> None:
    with pytest.raises(ConfigError):
        flatten(np.zeros(3, np.int32))
    with pytest.raises(ConfigError):
        flatten(np.zeros((4, 4), np.float32)[:, 1])
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ConfigError):
        flatten(ro)
    with pytest.raises(ConfigError):
        flatten(torch.zeros(4, 4).t())
    with pytest.raises(ConfigError):
        flatten(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ConfigError):
        flatten([1.0, 2.0])
