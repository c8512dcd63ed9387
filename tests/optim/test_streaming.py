"""Streaming DiLoCo: S1-S6 of docs/optimizers.md, and the E3M0 quantiser."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.local import LocalGroup
from examples import toy
from optim import DiLoCo, StreamingDiLoCo
from optim.flat import FlatParams
from optim.harness import run_threads, state_fingerprint
from optim.lowbit import BLOCK, e3m0_decode, e3m0_encode, payload_size

torch.set_num_threads(1)


def _run(cls: type, n: int, steps: int, hook: Any = None, **kw: Any) -> list[Any]:
    group = LocalGroup(n, timeout=30)

    def member(i: int) -> Any:
        model = toy.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        outer = cls(model, opt, group.member(i), **kw)
        for s in range(steps):
            toy.inner_step(model, opt, i, s)
            rec = outer.step()
            if hook is not None:
                hook(i, s, outer, rec)
        return outer

    return run_threads(n, member)


def test_s1_one_fragment_no_overlap_alpha0_is_diloco_bitwise() -> None:
    a = _run(DiLoCo, 2, 9, sync_every=3)
    b = _run(StreamingDiLoCo, 2, 9, fragments=1, sync_every=3, overlap=0, alpha=0.0, quant=None)
    assert torch.equal(a[0].theta, b[0].thetas[0]) and torch.equal(a[0].momentum, b[0].moms[0])
    assert torch.equal(a[0].space.read(), b[0].spaces[0].read())


def test_s2_fragments_one_peer_lr1_mu0_is_local_training() -> None:
    [o] = _run(StreamingDiLoCo, 1, 12, fragments=2, sync_every=4, overlap=0, alpha=0.0,
               quant=None, outer_lr=1.0, momentum=0.0)
    model = toy.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(12):
        toy.inner_step(model, opt, 0, s)
    torch.testing.assert_close(FlatParams(list(o.model.parameters())).read(),
                               FlatParams(list(model.parameters())).read(), atol=1e-6, rtol=1e-6)


def test_s3_schedule_each_fragment_every_h_steps_one_in_flight() -> None:
    sends: list[tuple[int, int]] = []
    recs: list[tuple[int, int]] = []

    def hook(i: int, s: int, outer: StreamingDiLoCo, rec: Any) -> None:
        if i == 0:
            p = outer.fragment_sent_at(outer.global_step)
            if p is not None:
                sends.append((outer.global_step, p))
            if rec is not None:
                recs.append((outer.global_step, rec.fragment))

    _run(StreamingDiLoCo, 2, 24, hook, fragments=3, sync_every=6, overlap=1)
    assert sends == [(1, 0), (3, 1), (5, 2), (7, 0), (9, 1), (11, 2), (13, 0), (15, 1), (17, 2),
                     (19, 0), (21, 1), (23, 2)]
    assert recs == [(s + 1, p) for s, p in sends]  # received tau=1 later, never overlapping


def test_s4_alpha_semantics_with_one_peer() -> None:
    at_send: list[torch.Tensor] = []

    def hook(i: int, s: int, outer: StreamingDiLoCo, rec: Any) -> None:
        if outer.fragment_sent_at(outer.global_step) is not None:
            at_send.append(outer.spaces[0].read())

    kw = dict(fragments=1, sync_every=4, overlap=2, quant=None, outer_lr=1.0, momentum=0.0)
    [one] = _run(StreamingDiLoCo, 1, 4, hook, alpha=1.0, **kw)
    ref = toy.make_model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for s in range(4):
        toy.inner_step(ref, opt, 0, s)
    # alpha=1: local weights untouched; the snapshot is the local value at send time.
    torch.testing.assert_close(one.spaces[0].read(), FlatParams(list(ref.parameters())).read())
    torch.testing.assert_close(one.thetas[0], at_send[0], atol=1e-6, rtol=1e-6)
    at_send.clear()
    [zero] = _run(StreamingDiLoCo, 1, 4, hook, alpha=0.0, **kw)
    # alpha=0: after the receive the fragment equals its value at send time (tau steps lost).
    torch.testing.assert_close(zero.spaces[0].read(), at_send[0], atol=1e-6, rtol=1e-6)


def test_s6_parity_with_e3m0_and_overlap() -> None:
    hashes: dict[int, list[str]] = {0: [], 1: [], 2: []}

    def hook(i: int, s: int, outer: StreamingDiLoCo, rec: Any) -> None:
        if rec is not None:
            hashes[i].append(state_fingerprint(outer.shared_state()))

    outs = _run(StreamingDiLoCo, 3, 16, hook, fragments=2, sync_every=4, overlap=1, alpha=0.5)
    assert len(hashes[0]) == 8 and hashes[0] == hashes[1] == hashes[2]
    rec = outs[0].records[-1]
    size = outs[0].thetas[rec.fragment].numel()
    assert rec.bytes_sent == 2 * payload_size(size)  # all-gather: own payload to 2 others


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=600))
def test_s5_e3m0_properties(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = e3m0_decode(e3m0_encode(x), x.numel())
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())
    assert bool((y[x == 0] == 0).all())
    scale = torch.zeros(x.numel())
    for b in range(0, x.numel(), BLOCK):
        scale[b : b + BLOCK] = x[b : b + BLOCK].abs().max()
    ok = (x != 0) & (x.abs() >= scale * 2.0**-6.5)
    ratio = (y[ok] / x[ok]).abs()
    assert bool((ratio >= 2**-0.5 - 1e-6).all()) and bool((ratio <= 2**0.5 + 1e-6).all())


def test_s5_e3m0_powers_of_two_round_trip_exactly() -> None:
    x = torch.tensor([3.0 * 2.0**-e for e in range(7)] + [-1.5, 0.0])
    torch.testing.assert_close(e3m0_decode(e3m0_encode(x), x.numel()), x, atol=0, rtol=0)
