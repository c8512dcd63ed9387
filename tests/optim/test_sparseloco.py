"""SparseLoCo: L1-L6 of docs/optimizers.md."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.local import LocalGroup
from examples import toy
from optim import DiLoCo, SparseLoCo
from optim import sparse_codec as sc
from optim.exchange import average_payloads
from optim.harness import run_threads
from peerd.errors import PeerLost, ProtocolError

torch.set_num_threads(1)


def _run(cls: type, n: int, steps: int, **kw: Any) -> list[Any]:
    group = LocalGroup(n, timeout=30)

    def member(i: int) -> Any:
        model = toy.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        outer = cls(model, opt, group.member(i), **kw)
        for s in range(steps):
            toy.inner_step(model, opt, i, s)
            outer.step()
        return outer

    return run_threads(n, member)


def test_l1_full_density_unquantised_equals_diloco_outer_sgd() -> None:
    a = _run(DiLoCo, 3, 9, sync_every=3, outer_lr=0.8, momentum=0.0)
    b = _run(SparseLoCo, 3, 9, sync_every=3, outer_lr=0.8, density=1.0, bits=None, beta=0.5)
    torch.testing.assert_close(a[0].theta, b[0].theta, atol=1e-6, rtol=1e-6)
    assert torch.equal(b[0].theta, b[1].theta) and torch.equal(b[0].theta, b[2].theta)
    assert float(b[0].error.abs().max()) == 0.0


def test_l2_error_feedback_conserves_the_pseudo_gradients() -> None:
    layouts = sc.plan([(0, 300), (300, 1000)], chunk=128, density=0.05)
    e = torch.zeros(1000, dtype=torch.float32)
    sent = torch.zeros(1000, dtype=torch.float64)
    total = torch.zeros(1000, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        delta = torch.randn(1000, generator=g)
        total += delta.double()
        e.add_(delta)  # beta = 1
        idx, vals = sc.decode(sc.encode(e, layouts, 2), layouts, 2)
        e[idx] -= vals
        sent.index_add_(0, idx, vals.double())
    torch.testing.assert_close(sent + e.double(), total, atol=1e-4, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 700), st.sampled_from([16, 64, 256]), st.floats(0.01, 1.0))
def test_l3_topk_per_chunk(numel: int, chunk: int, density: float) -> None:
    [lay] = sc.plan([(0, numel)], chunk, density)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    idx, vals = sc.decode(sc.encode(x, [lay], None), [lay], None)
    assert bool((idx < numel).all()) and len(set(idx.tolist())) == idx.numel()
    for c in range(lay.n_chunks):
        lo, hi = c * lay.chunk, min(numel, (c + 1) * lay.chunk)
        mine = idx[(idx >= lo) & (idx < hi)]
        assert mine.numel() == min(lay.k, hi - lo)
        kth = x[mine].abs().min()
        assert int((x[lo:hi].abs() > kth).sum()) < lay.k
    torch.testing.assert_close(vals, x[idx])


def test_l4_two_bit_quantiser() -> None:
    v = torch.randn(500, generator=torch.Generator().manual_seed(1))
    codes, header = sc.quantize2(v)
    decoded = header[torch.from_numpy(codes.astype(np.int64))] + header[4]
    assert decoded.unique().numel() <= 4
    for j in range(4):
        sel = torch.from_numpy(codes == j)
        if sel.any():
            torch.testing.assert_close(decoded[sel][0], (v[sel] - v.mean()).mean() + v.mean())
    c, h = sc.quantize2(torch.full((9,), 0.25))
    assert bool(((h[torch.from_numpy(c.astype(np.int64))] + h[4]) == 0.25).all())


def test_l5_shuffled_payload_order_is_canonicalised_by_view_order() -> None:
    layouts = sc.plan([(0, 2000)], chunk=256, density=0.05)
    payloads = [sc.encode(torch.randn(2000, generator=torch.Generator().manual_seed(i)),
                          layouts, 2) for i in range(3)]
    peers = ("a", "b", "c")

    def decode(raw: np.ndarray) -> torch.Tensor:
        idx, vals = sc.decode(raw, layouts, 2)
        return torch.zeros(2000).index_add_(0, idx, vals)

    ref = average_payloads(payloads, peers, decode, own_size=payloads[0].size).value
    for seed in range(3):
        order = list(range(3))
        random.Random(seed).shuffle(order)
        # the collective returns payloads in view order whatever their arrival order
        got = sorted(zip([peers[i] for i in order], [payloads[i] for i in order], strict=True))
        res = average_payloads([p for _, p in got], tuple(n for n, _ in got), decode,
                               own_size=payloads[0].size)
        assert torch.equal(res.value, ref)


def test_l6_disjoint_indices_give_value_over_r() -> None:
    layouts = sc.plan([(0, 8)], chunk=8, density=0.25)
    a = torch.tensor([5.0, 4.0, 0, 0, 0, 0, 0, 0])
    b = torch.tensor([0, 0, 0, 0, 0, 0, 3.0, 2.0])

    def decode(raw: np.ndarray) -> torch.Tensor:
        idx, vals = sc.decode(raw, layouts, None)
        return torch.zeros(8).index_add_(0, idx, vals)

    pa, pb = sc.encode(a, layouts, None), sc.encode(b, layouts, None)
    avg = average_payloads([pa, pb], ("a", "b"), decode, own_size=pa.size).value
    torch.testing.assert_close(avg, (a + b) / 2)


def test_malformed_payloads_are_rejected() -> None:
    """The codec's own tests cover each malformation; here: a bad payload in a
    gather is dropped and counted, the others are averaged."""
    layouts = sc.plan([(0, 100)], chunk=100, density=0.1)
    good = sc.encode(torch.randn(100), layouts, 2)

    def decode(raw: np.ndarray) -> torch.Tensor:
        idx, vals = sc.decode(raw, layouts, 2)
        return torch.zeros(100).index_add_(0, idx, vals)

    with pytest.raises(ProtocolError):
        decode(good[:-1])
    res = average_payloads([good, good[:-1]], ("a", "b"), decode, own_size=good.size)
    assert res.participants == ("a",) and res.rejected == 1
    assert torch.equal(res.value, decode(good))


class _SizeLog:
    """Wraps a member's collective and logs the size of every payload it gathers."""

    def __init__(self, inner: Any, log: list[list[int]]) -> None:
        self.inner, self.log = inner, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def all_gather(self, array: Any, *, tag: str = "gather", retry: bool = True) -> Any:
        arrays, peers = self.inner.all_gather(array, tag=tag, retry=retry)
        self.log.append([np.asarray(a).size for a in arrays])
        return arrays, peers


def test_round_bytes_follow_the_all_gather_formula() -> None:
    """Payload sizes vary with the index sets: each round a member sends its own
    payload to the 2 others and receives theirs."""
    group = LocalGroup(3, timeout=30)
    logs: list[list[list[int]]] = [[], [], []]

    def member(i: int) -> Any:
        model = toy.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        outer = SparseLoCo(model, opt, _SizeLog(group.member(i), logs[i]), sync_every=3,
                           density=1 / 16, chunk=64)
        for s in range(6):
            toy.inner_step(model, opt, i, s)
            outer.step()
        return outer

    outs = run_threads(3, member)
    layouts = outs[0].layouts
    # the all-gather formula of the spec with 12-bit indices (the old format)
    twelve_bit = sum(3 * -(-lay.count // 2) + 20 + -(-lay.count // 4) for lay in layouts)
    for i, out in enumerate(outs):
        assert len(out.records) == len(logs[i]) == 2
        for rec, sizes in zip(out.records, logs[i], strict=True):
            own = sizes[i]
            assert rec.bytes_sent == 2 * own and rec.bytes_received == sum(sizes) - own
            assert all(size < twelve_bit for size in sizes)
            assert own <= sc.max_payload_size(layouts, 2)
    assert logs[0] == logs[1] == logs[2]  # everyone saw the same payloads
    assert torch.equal(outs[0].theta, outs[1].theta) and torch.equal(outs[0].theta, outs[2].theta)


class _LostInGather:
    """A member is lost during the ``fail_call``-th gather: the collective redoes it
    over the survivors when asked to retry, and raises ``PeerLost`` otherwise."""

    def __init__(self, inner: Any, fail_call: int) -> None:
        self.inner, self.fail_call, self.calls = inner, fail_call, 0
        self.retry_flags: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def all_gather(self, array: Any, *, tag: str = "gather", retry: bool = True) -> Any:
        self.calls += 1
        self.retry_flags.append(retry)
        if self.calls == self.fail_call and not retry:
            raise PeerLost(["ghost"], "injected")
        return self.inner.all_gather(array, tag=tag, retry=retry)


@pytest.mark.parametrize("policy", ["retry", "skip"])
def test_a_member_lost_mid_gather_follows_the_on_peer_lost_policy(policy: str) -> None:
    """Under "skip" the gather must not be retried, so the round is dropped (theta
    kept, the EF residual kept for the next round); under "retry" it goes on."""
    model = toy.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    coll = _LostInGather(LocalGroup(1).member(0), fail_call=2)
    outer = SparseLoCo(model, opt, coll, sync_every=2, on_peer_lost=policy)  # type: ignore[arg-type]
    thetas, errors = [], []
    for s in range(6):
        toy.inner_step(model, opt, 0, s)
        if outer.step() is not None:
            thetas.append(outer.theta.clone())
            errors.append(outer.error.clone())
    assert coll.retry_flags == [policy == "retry"] * 3
    skipped = [r.skipped for r in outer.records]
    if policy == "retry":
        assert skipped == [False] * 3 and outer.outer_steps == 3
        return
    assert skipped == [False, True, False] and outer.outer_steps == 2
    assert torch.equal(thetas[1], thetas[0])
    assert torch.equal(outer.space.read(), outer.theta)
    assert errors[1].abs().sum() > errors[0].abs().sum()  # nothing was taken out of EF
