"""SPES: E1-E6 of docs/optimizers.md and expert re-assignment on a holder's death."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from collectives.local import LocalGroup
from examples.tiny_gpt import lm_loss
from examples.tiny_moe import MoEConfig, make_moe
from optim import SPES, DiLoCo
from optim.experts import expert_holders, merge_alpha, merge_experts
from optim.harness import model_fingerprint, run_threads
from peerd.errors import PeerLost

torch.set_num_threads(1)
CFG = MoEConfig(n_layer=1, n_head=2, d_model=16, seq_len=8, n_experts=4, expert_hidden=16)


def _batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (4, CFG.seq_len + 1),
                      generator=torch.Generator().manual_seed(worker * 1000 + step))
    return x[:, :-1], x[:, 1:]


def _run(cls: type, n: int, steps: int, hook: Any = None, group: LocalGroup | None = None,
         **kw: Any) -> list[Any]:
    group = group or LocalGroup(n, timeout=30)

    def member(i: int) -> Any:
        model = make_moe(CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        extra = {"experts": model.expert_params()} if cls is SPES else {}
        try:
            outer = cls(model, opt, group.member(i), **kw, **extra)
            for s in range(steps):
                opt.zero_grad(set_to_none=True)
                lm_loss(model, *_batch(i, s)).backward()
                opt.step()
                if hook is not None:
                    hook(i, s, outer, "before")
                rec = outer.step()
                if hook is not None:
                    hook(i, s, outer, rec)
        except PeerLost:
            return None
        return outer

    return run_threads(n, member)


def test_e1_single_node_sync_is_identity() -> None:
    [o] = _run(SPES, 1, 6, sync_every=2, merge_interval=2, merge_alpha0=0.0)
    model = make_moe(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(6):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, *_batch(0, s)).backward()
        opt.step()
    assert model_fingerprint(o.model) == model_fingerprint(model)


def test_e2_e3_ownership_shared_mean_and_frozen_experts() -> None:
    uploads: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}

    def hook(i: int, s: int, outer: SPES, rec: Any) -> None:
        if rec == "before":
            if s == 3:
                uploads[i] = outer.space.read()
            if s == 0:
                before[i] = outer.space.read()
        elif s == 2:  # between syncs: non-owned experts are bitwise unchanged
            now = outer.space.read()
            for layer in outer.expert_idx:
                for e, idx in enumerate(layer):
                    if e not in outer.owned(outer.me):
                        assert torch.equal(now[idx], before[i][idx])

    outs = _run(SPES, 2, 4, hook, sync_every=4, merge_interval=4, merge_alpha0=0.0)
    o = outs[0]
    theta = o.theta
    assert torch.equal(theta, outs[1].theta)
    torch.testing.assert_close(theta[o.shared_idx],
                               (uploads[0][o.shared_idx] + uploads[1][o.shared_idx]) / 2)
    for layer in o.expert_idx:
        for e, idx in enumerate(layer):
            owner = int(o.holders[e][0][1:])
            assert torch.equal(theta[idx], uploads[owner][idx])


def test_e4_merge_properties_and_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 12, generator=g, dtype=torch.float64)
    assert torch.equal(merge_experts(v, 6, 0.0), v)
    same = v[:1].repeat(5, 1)
    torch.testing.assert_close(merge_experts(same, 6, 0.3), same)
    out = merge_experts(v, 6, 0.3, neighbours=4)  # E=5, K=4: every other expert
    mean_others = (v.sum(0) - v[2]) / 4
    torch.testing.assert_close(out[2], v[2] + 0.3 * (mean_others - v[2]))
    perm = torch.tensor([3, 1, 4, 0, 2])
    permuted_first = merge_experts(v[perm], 6, 0.3, 2)
    torch.testing.assert_close(permuted_first, merge_experts(v, 6, 0.3, 2)[perm])


def test_e5_all_experts_everywhere_equals_diloco_model_averaging() -> None:
    a = _run(SPES, 2, 6, sync_every=3, copies=2, merge_interval=3, merge_alpha0=0.0)
    b = _run(DiLoCo, 2, 6, sync_every=3, outer_lr=1.0, momentum=0.0)
    torch.testing.assert_close(a[0].theta, b[0].theta, atol=1e-6, rtol=1e-5)


def test_e6_alpha_schedule() -> None:
    assert merge_alpha(0, 0.1, 4000) == pytest.approx(0.1)
    assert merge_alpha(1000, 0.1, 4000) == pytest.approx(0.075)
    assert merge_alpha(4000, 0.1, 4000) == 0.0 and merge_alpha(9000, 0.1, 4000) == 0.0


def test_holders_cover_every_expert_and_move_when_a_holder_leaves() -> None:
    four = expert_holders(8, ["a", "b", "c", "d"])
    assert sorted(e for e, h in enumerate(four) if h == ("c",)) == [2, 6]
    three = expert_holders(8, ["a", "b", "d"])
    assert all(h and "c" not in h for h in three)


def test_death_reassigns_experts_and_keeps_members_identical() -> None:
    group = LocalGroup(3, timeout=30)
    died = threading.Event()
    fps: dict[int, list[str]] = {0: [], 1: []}

    def hook(i: int, s: int, outer: SPES, rec: Any) -> None:
        if i == 2 and s == 4 and rec == "before":
            group.kill(2)
            died.set()
        if i < 2 and rec not in (None, "before"):
            fps[i].append(model_fingerprint(outer.model))

    outs = _run(SPES, 3, 10, hook, group=group, sync_every=2, merge_interval=2,
                merge_alpha0=0.05, merge_decay_steps=8)
    assert outs[2] is None and died.is_set()
    assert fps[0] == fps[1] and len(fps[0]) == 5
    assert outs[0].members == ("m0", "m1")
    assert {e for h in outs[0].holders for e in h} == {"m0", "m1"}
    trainable = {e for e in range(4)
                 if all(p.requires_grad for p in outs[0].experts[0][e])}
    assert trainable == set(outs[0].owned("m0")) and len(trainable) == 2
