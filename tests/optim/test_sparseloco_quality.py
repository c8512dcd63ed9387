"""SparseLoCo correctness checks behind the quality work (issue #7): the EF
accumulator, the sign and scale of the applied update, top-k per chunk within
each parameter, the 2-bit scale, and the two aggregation rules."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from collectives.local import LocalGroup
from examples import toy
from optim import SparseLoCo
from optim import sparse_codec as sc
from optim.harness import run_threads
from peerd.errors import ConfigError

torch.set_num_threads(1)


def _single(**kw: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer, SparseLoCo]:
    model = toy.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, SparseLoCo(model, opt, LocalGroup(1).member(0), **kw)


@pytest.mark.parametrize("bits", [None, 2])
def test_one_member_round_follows_the_ef_recurrence(bits: int | None) -> None:
    """Replays e <- beta*e + (theta - local); sent = e - e_after; theta -= lr*sent."""
    beta, lr = 0.9, 0.8
    model, opt, outer = _single(sync_every=2, beta=beta, outer_lr=lr, density=0.25, chunk=16,
                                bits=bits)
    rounds = 0
    for s in range(8):
        toy.inner_step(model, opt, 0, s)
        local, theta0, e0 = outer.space.read(), outer.theta.clone(), outer.error.clone()
        if outer.step() is None:
            continue
        rounds += 1
        acc = beta * e0 + (theta0 - local)
        sent = acc - outer.error
        # sent is exactly what theta moved by (R=1: the mean over one member is its value)
        torch.testing.assert_close(outer.theta, theta0 - lr * sent, atol=1e-6, rtol=1e-6)
        # sent is non-zero only on the top-k of |acc| per chunk of each parameter
        for lay in outer.layouts:
            for c in range(lay.n_chunks):
                lo = lay.start + c * lay.chunk
                hi = min(lay.start + lay.numel, lo + lay.chunk)
                picked = (sent[lo:hi] != 0).nonzero().reshape(-1)
                assert picked.numel() <= min(lay.k, hi - lo)
                if picked.numel():
                    floor = acc[lo:hi].abs()[picked].min()
                    assert int((acc[lo:hi].abs() > floor).sum()) <= lay.k
        nz = sent != 0
        if bits is None:  # unquantised: the picked entries are sent exactly
            torch.testing.assert_close(sent[nz], acc[nz])
        # the local model restarts from the new global model
        assert torch.equal(outer.space.read(), outer.theta)
    assert rounds == 4


def test_update_moves_theta_towards_the_local_model() -> None:
    """Sign check: with beta=0 the first round's picked entries land exactly on the
    local weights (theta - (theta - local) = local); the others stay put."""
    model, opt, outer = _single(sync_every=3, beta=0.0, outer_lr=1.0, density=0.2, chunk=8,
                                bits=None)
    theta0 = outer.theta.clone()
    for s in range(3):
        toy.inner_step(model, opt, 0, s)
        local = outer.space.read()
        outer.step()
    moved = outer.theta != theta0
    assert bool(moved.any())
    torch.testing.assert_close(outer.theta[moved], local[moved], atol=1e-7, rtol=0)
    assert torch.equal(outer.theta[~moved], theta0[~moved])


def test_chunks_never_straddle_two_parameters() -> None:
    layouts = sc.plan([(0, 10), (10, 4106), (4106, 4200)], chunk=4096, density=1 / 64)
    assert [(lay.start, lay.numel, lay.chunk, lay.k) for lay in layouts] == [
        (0, 10, 10, 1), (10, 4096, 4096, 64), (4106, 94, 94, 1)]
    e = torch.zeros(4200)
    e[0:10] = 100.0  # a huge first parameter must not steal the second one's budget
    e[10:4106] = torch.linspace(-1, 1, 4096)
    idx, _ = sc.decode(sc.encode(e, layouts, None), layouts, None)
    assert int(((idx >= 10) & (idx < 4106)).sum()) == 64
    assert int((idx < 10).sum()) == 1


def test_two_bit_scale_keeps_signs_of_topk_values() -> None:
    """On top-k values of a Gaussian accumulator (bimodal, mean ~0) the 2-bit decode
    keeps every sign and most of the direction."""
    [lay] = sc.plan([(0, 8 * 4096)], 4096, 1 / 64)
    e = torch.randn(8 * 4096, generator=torch.Generator().manual_seed(5))
    idx, exact = sc.decode(sc.encode(e, [lay], None), [lay], None)
    idx2, q = sc.decode(sc.encode(e, [lay], 2), [lay], 2)
    assert torch.equal(idx, idx2)
    assert bool((q * exact > 0).all())
    cos = torch.nn.functional.cosine_similarity(q, exact, dim=0)
    assert float(cos) > 0.98
    assert float((q - exact).norm() / exact.norm()) < 0.2


def _decoded(outer: SparseLoCo, dense: torch.Tensor) -> np.ndarray:
    return sc.encode(dense, outer.layouts, None)


@pytest.mark.parametrize("rule", ["index_mean", "peers"])
def test_aggregation_rules(rule: str) -> None:
    _, _, outer = _single(density=0.25, chunk=8, bits=None, aggregate=rule)
    n = outer.space.size
    a, b = torch.zeros(n), torch.zeros(n)
    a[0], a[1] = 4.0, 2.0  # chunk 0 (k=2): a sends 0 and 1
    b[1], b[2] = 6.0, 5.0  # b sends 1 and 2
    avg = (outer.decode_dense(_decoded(outer, a)) + outer.decode_dense(_decoded(outer, b))) / 2
    got = outer.combine(avg)[:3]
    want = [4.0, 4.0, 5.0] if rule == "index_mean" else [2.0, 4.0, 2.5]
    assert got.tolist() == want
    assert float(outer.combine(avg)[3:].abs().max()) == 0.0


def test_full_density_rules_are_the_same_bits() -> None:
    def run(rule: str) -> torch.Tensor:
        group = LocalGroup(3, timeout=30)

        def member(i: int) -> torch.Tensor:
            model = toy.make_model()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            outer = SparseLoCo(model, opt, group.member(i), sync_every=3, density=1.0,
                               bits=None, aggregate=rule)  # type: ignore[arg-type]
            for s in range(9):
                toy.inner_step(model, opt, i, s)
                outer.step()
            return outer.theta

        return run_threads(3, member)[0]

    assert torch.equal(run("index_mean"), run("peers"))


def test_unknown_rule_is_rejected() -> None:
    with pytest.raises(ConfigError):
        _single(aggregate="median")
