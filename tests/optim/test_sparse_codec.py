"""SparseLoCo's wire format: Rice-coded index sets round-trip for any set, sizes
stay near the entropy bound, and every malformed payload raises ProtocolError."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optim import rice
from optim import sparse_codec as sc
from peerd.errors import ConfigError, ProtocolError

torch.set_num_threads(1)


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[sc.Layout, np.ndarray]:
    """A layout and a chosen set of global indices: exactly k per full chunk and
    min(k, tail) in a shorter last chunk, k from 1 to the chunk size."""
    chunk = draw(st.sampled_from([1, 2, 3, 7, 64, 100, 1024, 4096, 8192]))
    n_chunks = draw(st.integers(1, 3))
    numel = draw(st.integers((n_chunks - 1) * chunk + 1, n_chunks * chunk))
    chunk = min(chunk, numel)
    k = draw(st.one_of(st.just(1), st.just(chunk), st.integers(1, chunk)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    chosen = []
    for lo in range(0, numel, chunk):
        size = min(chunk, numel - lo)
        chosen.append(lo + rng.choice(size, min(k, size), replace=False))
    return sc.Layout(0, numel, chunk, k), np.sort(np.concatenate(chosen))


def _dense(numel: int, chosen: np.ndarray, seed: int) -> torch.Tensor:
    """Chosen entries are the only non-zeros (magnitudes 1..2, random signs), so
    they are exactly the top-k."""
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(numel)
    vals = 1 + torch.rand(len(chosen), generator=g)
    e[torch.from_numpy(chosen)] = vals * torch.where(torch.rand(len(chosen), generator=g) < 0.5,
                                                     -1.0, 1.0)
    return e


@settings(max_examples=60, deadline=None)
@given(index_sets(), st.sampled_from([None, 2]))
def test_any_index_set_round_trips(case: tuple[sc.Layout, np.ndarray], bits: int | None) -> None:
    lay, chosen = case
    numel, k = lay.numel, lay.k
    assert (np.bincount(chosen // lay.chunk, minlength=lay.n_chunks) == lay.ks()).all()
    e = _dense(numel, chosen, seed=numel + k)
    raw = sc.encode(e, [lay], bits)
    assert raw.size <= sc.max_payload_size([lay], bits)
    idx, vals = sc.decode(raw, [lay], bits)
    assert idx.tolist() == chosen.tolist()  # sorted, and values in the same order
    if bits is None:
        assert torch.equal(vals, e[idx])
    else:
        # at most 4 decoded values, each the mean of the originals it stands for
        # (bfloat16 on the wire)
        assert vals.unique().numel() <= sc.BINS
        for v in vals.unique():
            torch.testing.assert_close(e[idx][vals == v].mean(), v, rtol=1e-2, atol=1e-6)


def test_rice_pieces_round_trip() -> None:
    rng = np.random.default_rng(0)
    ks = np.array([1, 5, 64, 3])
    local = np.concatenate([np.sort(rng.choice(4096, k, replace=False)) for k in ks])
    gaps = rice.to_gaps(local, ks)
    assert (gaps >= 0).all() and (rice.from_gaps(gaps, ks) == local).all()
    for r in (0, 1, 6, 12, 16):
        low = gaps & ((1 << r) - 1)
        assert (rice.read_fixed(rice.fixed_bits(low, r), gaps.size, r) == low).all()
    q = gaps >> 3
    assert (rice.read_unary(rice.pack(rice.unary_bits(q)), q.size) == q).all()


def test_index_bytes_are_near_the_entropy_bound() -> None:
    [lay] = sc.plan([(0, 64 * 4096)], 4096, 1 / 64)
    e = torch.randn(64 * 4096, generator=torch.Generator().manual_seed(2))
    raw = sc.encode(e, [lay], 2)
    code_bytes, table_bytes = 64 * 64 * 2 / 8, 1 + 2 * sc.BINS
    index_bytes_per_chunk = (raw.size - table_bytes - code_bytes) / 64
    bound = (math.lgamma(4097) - math.lgamma(65) - math.lgamma(4033)) / math.log(2) / 8
    assert bound <= index_bytes_per_chunk < 1.05 * bound  # ~59 bytes; 12-bit fields: 96


def test_chunks_may_exceed_4096() -> None:
    [lay] = sc.plan([(0, 20000)], 16384, 1 / 64)
    e = torch.randn(20000, generator=torch.Generator().manual_seed(4))
    idx, vals = sc.decode(sc.encode(e, [lay], None), [lay], None)
    assert torch.equal(vals, e[idx])
    assert idx.numel() == 256 + min(256, 20000 - 16384)
    with pytest.raises(ConfigError):
        sc.plan([(0, 10)], sc.MAX_CHUNK + 1, 0.5)


# ---- malformed payloads -------------------------------------------------------------

LAY = [sc.Layout(0, 8, 8, 2)]  # one chunk of 8, k=2


def _assemble(params: list[int], values: list[float], gaps: list[int], *,
              unary: np.ndarray | None = None) -> np.ndarray:
    """A bits=None payload for LAY built by hand (r low bits, then unary)."""
    g = np.array(gaps, np.int64)
    r = params[0]
    fixed = rice.pack(rice.fixed_bits(g & ((1 << r) - 1), r))
    un = rice.pack(rice.unary_bits(g >> r)) if unary is None else unary
    return np.concatenate([np.array(params, np.uint8),
                           np.array(values, "<f4").view(np.uint8), fixed, un])


def test_hand_built_payload_decodes() -> None:
    idx, vals = sc.decode(_assemble([1], [3.0, -2.0], [2, 4]), LAY, None)
    assert idx.tolist() == [2, 7] and vals.tolist() == [3.0, -2.0]


@pytest.mark.parametrize("bits", [None, 2])
def test_truncated_extended_and_mistyped_payloads_are_rejected(bits: int | None) -> None:
    layouts = sc.plan([(0, 100), (100, 5000)], chunk=256, density=0.1)
    good = sc.encode(torch.randn(5000, generator=torch.Generator().manual_seed(1)), layouts, bits)
    sc.decode(good, layouts, bits)
    bad = [good[:-1], good[: good.size // 2], good[:0], np.concatenate([good, [0]]),
           np.concatenate([good, [1]]), good.astype(np.int16), good.reshape(1, -1),
           np.zeros(sc.max_payload_size(layouts, bits) + 1, np.uint8)]
    for raw in bad:
        with pytest.raises(ProtocolError):
            sc.decode(raw, layouts, bits)


def test_index_outside_its_chunk_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        sc.decode(_assemble([0], [1.0, 1.0], [5, 2]), LAY, None)  # 5 and 8: 8 >= chunk
    with pytest.raises(ProtocolError):
        sc.decode(_assemble([3], [1.0, 1.0], [8, 0]), LAY, None)  # first index 8


def test_rice_parameter_out_of_range_is_rejected() -> None:
    raw = _assemble([1], [1.0, 1.0], [0, 0])
    raw[0] = rice.MAX_PARAM + 1
    with pytest.raises(ProtocolError):
        sc.decode(raw, LAY, None)


def test_bad_unary_streams_are_rejected() -> None:
    # three codewords where two are expected; one; a trailing all-zero byte
    for un in (rice.pack(rice.unary_bits(np.array([0, 0, 0]))),
               rice.pack(rice.unary_bits(np.array([1]))),
               np.concatenate([rice.pack(rice.unary_bits(np.array([0, 1]))), [0]])):
        with pytest.raises(ProtocolError):
            sc.decode(_assemble([0], [1.0, 1.0], [0, 1], unary=un.astype(np.uint8)), LAY, None)


def test_nonzero_padding_in_the_fixed_field_is_rejected() -> None:
    raw = _assemble([1], [1.0, 1.0], [0, 1])  # 2 low bits used of the fixed byte
    raw[1 + 8] |= 0x80
    with pytest.raises(ProtocolError):
        sc.decode(raw, LAY, None)


@pytest.mark.parametrize("word", [0x7FC0, 0x7F80, 0xFF80])  # bf16 NaN, +inf, -inf
def test_non_finite_values_are_rejected(word: int) -> None:
    layouts = sc.plan([(0, 64)], 64, 0.25)
    raw = sc.encode(torch.randn(64, generator=torch.Generator().manual_seed(3)), layouts, 2)
    raw[1:3] = np.array([word], "<u2").view(np.uint8)  # first table entry
    with pytest.raises(ProtocolError):
        sc.decode(raw, layouts, 2)
    with pytest.raises(ProtocolError):
        sc.decode(_assemble([0], [float("nan"), 1.0], [0, 0]), LAY, None)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_payloads_raise_or_decode_to_valid_sets(data: st.DataObject) -> None:
    """Whatever bytes arrive, decode raises ProtocolError or returns per-chunk
    strictly increasing in-range indices (no duplicates) with finite values."""
    bits = data.draw(st.sampled_from([None, 2]))
    layouts = sc.plan([(0, 50), (50, 1000)], chunk=128, density=0.05)
    good = sc.encode(torch.randn(1000, generator=torch.Generator().manual_seed(7)), layouts, bits)
    raw = good.copy()
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, raw.size - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, raw.size))]
    try:
        idx, vals = sc.decode(raw, layouts, bits)
    except ProtocolError:
        return
    assert idx.numel() == sum(lay.count for lay in layouts) == vals.numel()
    assert len(set(idx.tolist())) == idx.numel() and bool((idx < 1000).all())
    assert bool(torch.isfinite(vals).all())


def test_tensors_sending_at_most_four_values_send_them_as_bf16() -> None:
    layouts = sc.plan([(0, 64), (64, 64 + 4096)], 4096, 1 / 64)  # k=1, then k=64
    e = torch.randn(64 + 4096, generator=torch.Generator().manual_seed(6))
    raw = sc.encode(e, layouts, 2)
    idx, vals = sc.decode(raw, layouts, 2)
    assert int(idx[0]) == int(e[:64].abs().argmax())
    assert float(vals[0]) == float(e[idx[0]].to(torch.bfloat16))
    # the small tensor adds its Rice byte, a 2-byte value and at most a byte to each
    # bit stream (7 index bits); with a 4-entry table and codes it was 12+
    alone = sc.encode(e[64:], [sc.Layout(0, 4096, 4096, 64)], 2).size
    assert raw.size - alone <= 1 + 2 + 2


@pytest.mark.parametrize("bits", [None, 2])
def test_ties_still_send_exactly_k_and_the_sender_refuses_nans(bits: int | None) -> None:
    layouts = sc.plan([(0, 3000)], 1024, 1 / 64)  # chunks 1024, 1024, 952; k=16
    e = torch.ones(3000)
    e[5] = -1.0  # every magnitude ties
    idx, _ = sc.decode(sc.encode(e, layouts, bits), layouts, bits)
    assert np.bincount(idx.numpy() // 1024).tolist() == [16, 16, 16]
    e[1500] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sc.encode(e, layouts, bits)
