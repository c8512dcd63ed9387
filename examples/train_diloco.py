"""Train the tiny GPT (or tiny MoE) with any ``Collective`` and any outer loop.

Library use (the daemon client, an in-process node or a LocalGroup member)::

    from examples.train_diloco import TrainConfig, train_worker
    result = train_worker(peerd.connect(), TrainConfig(method="diloco"), worker=rank)

Command line (members as threads on one LocalGroup)::

    python -m examples.train_diloco --peers 4 --steps 200 --method diloco
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from collectives.api import Collective, ReduceOp
from collectives.local import LocalGroup
from examples.data import ByteStream, evaluate, held_out_batches, load_corpus
from examples.tiny_gpt import GPTConfig, lm_loss, make_gpt
from examples.tiny_moe import MoEConfig, make_moe
from optim import SPES, DelayedDiLoCo, DiLoCo, OuterLoop, SparseLoCo, StreamingDiLoCo
from optim.flat import FlatParams
from optim.harness import model_fingerprint, run_threads
from peerd.errors import ConfigError

METHODS = ("ddp", "diloco", "delayed", "streaming", "sparseloco", "spes")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "diloco"
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    sync_every: int = 50
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, d_model=96, seq_len=64))
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        n_layer=2, d_model=96, seq_len=64, n_experts=8, expert_hidden=96))
    use_moe: bool = False  # train the tiny MoE (always for "spes")
    eval_batches: int = 8
    train_bytes: int = 2_000_000
    eval_bytes: int = 200_000
    seed: int = 0
    outer: dict[str, Any] = field(default_factory=dict)  # extra optimizer keyword arguments


@dataclass(frozen=True)
class WorkerResult:
    member: str
    method: str
    held_out_loss: float
    train_loss_start: float
    train_loss_end: float
    bytes_sent: int
    bytes_received: int
    rounds: int
    fingerprint: str
    seconds: float


class DataParallel:
    """The DDP baseline: average gradients with one all-reduce every step."""

    def __init__(self, model: torch.nn.Module, collective: Collective) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.collective = collective
        self.bytes_sent = self.bytes_received = self.rounds = 0

    def sync_grads(self) -> None:
        for p in self.params:
            if p.grad is None:  # e.g. an expert that got no tokens this step
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        res = self.collective.all_reduce(flat, ReduceOp.AVG, tag="ddp")
        FlatParams(grads).write(flat)  # type: ignore[arg-type]
        self.bytes_sent += res.bytes_sent
        self.bytes_received += res.bytes_received
        self.rounds += 1


def build_outer(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
                collective: Collective, *, joining: bool = False) -> OuterLoop | None:
    kw: dict[str, Any] = {"sync_every": cfg.sync_every, "joining": joining, **cfg.outer}
    if cfg.method == "ddp":
        return None
    if cfg.method == "diloco":
        return DiLoCo(model, opt, collective, **kw)
    if cfg.method == "delayed":
        return DelayedDiLoCo(model, opt, collective, **kw)
    if cfg.method == "streaming":
        return StreamingDiLoCo(model, opt, collective, **kw)
    if cfg.method == "sparseloco":
        return SparseLoCo(model, opt, collective, **kw)
    if cfg.method == "spes":
        kw.setdefault("merge_interval", cfg.sync_every)
        return SPES(model, opt, collective, experts=model.expert_params(), **kw)  # type: ignore[operator]
    raise ConfigError(f"unknown method {cfg.method!r}; choose one of {METHODS}")


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return factor


def advance(sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Move the learning-rate schedule on by ``steps`` steps taken elsewhere."""
    with warnings.catch_warnings():  # stepping a scheduler without the optimizer warns
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            sched.step()


def train_worker(
    collective: Collective,
    cfg: TrainConfig,
    *,
    worker: int,
    joining: bool = False,
    hook: Callable[[int, OuterLoop | None], None] | None = None,
) -> WorkerResult:
    """Train one member for ``cfg.steps`` inner steps; ``hook(step, outer)`` runs after
    every step (tests use it to kill or check members)."""
    t0 = time.monotonic()
    train, held = load_corpus(cfg.train_bytes, cfg.eval_bytes)
    moe = cfg.use_moe or cfg.method == "spes"
    model = make_moe(cfg.moe, cfg.seed) if moe else make_gpt(cfg.model, cfg.seed)
    seq_len = (cfg.moe if moe else cfg.model).seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    ddp = DataParallel(model, collective) if cfg.method == "ddp" else None
    outer = build_outer(cfg, model, opt, collective, joining=joining)
    start = outer.global_step if outer is not None else 0
    advance(sched, start)  # a joiner continues the run's schedule
    stream = ByteStream(train, seq_len, seed=cfg.seed * 1000 + worker + 7919 * start)
    losses: list[float] = []
    step = start
    while step < cfg.steps:
        x, y = stream.batch(cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, x, y)
        loss.backward()
        if ddp is not None:
            ddp.sync_grads()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        sched.step()
        done = step
        step += 1
        if outer is not None:
            outer.step()
            # A member evicted and readmitted in that step (``OuterLoop.round_lost``)
            # received the run's state: it goes on from the run's step.
            advance(sched, outer.global_step - step)
            step = outer.global_step
        losses.append(float(loss.detach()))
        if hook is not None:
            hook(done, outer)
    if isinstance(outer, DelayedDiLoCo):
        outer.flush()
    eval_loss = evaluate(model, held_out_batches(held, seq_len, cfg.eval_batches, 16))
    if outer is not None:
        stats = outer.statistics()
        sent, received, rounds = stats.bytes_sent, stats.bytes_received, stats.rounds
    else:
        assert ddp is not None
        sent, received, rounds = ddp.bytes_sent, ddp.bytes_received, ddp.rounds
    n = max(1, min(10, len(losses) // 2))  # start and end windows never overlap
    return WorkerResult(
        member=collective.view().me,
        method=cfg.method,
        held_out_loss=eval_loss,
        train_loss_start=sum(losses[:n]) / n,
        train_loss_end=sum(losses[-n:]) / n,
        bytes_sent=sent,
        bytes_received=received,
        rounds=rounds,
        fingerprint=model_fingerprint(model),
        seconds=time.monotonic() - t0,
    )


def run_local(cfg: TrainConfig, peers: int) -> list[WorkerResult]:
    """All members as threads on one LocalGroup."""
    group = LocalGroup(peers)
    return run_threads(peers, lambda i: train_worker(group.member(i), cfg, worker=i))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sync-every", type=int, default=50)
    ap.add_argument("--method", choices=METHODS, default="diloco")
    args = ap.parse_args(argv)
    cfg = replace(TrainConfig(), method=args.method, steps=args.steps, sync_every=args.sync_every)
    for r in run_local(cfg, args.peers):
        print(f"{r.member} {r.method}: held-out loss {r.held_out_loss:.4f} "
              f"train {r.train_loss_start:.3f}->{r.train_loss_end:.3f} "
              f"sent {r.bytes_sent} B in {r.rounds} rounds, {r.seconds:.1f} s")


if __name__ == "__main__":
    main()
