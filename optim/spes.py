"""SPES (Zhang et al. 2026): decentralised MoE training where each member trains
the shared weights plus a subset of the experts, without a parameter server.

Every ``sync_every`` inner steps:
  shared params: all-reduce AVG of the local values (FedAvg, no outer optimizer)
  experts: all-gather of each member's own experts (fp32); expert e becomes the
           mean of its holders' copies in view order; an expert none of whose
           holders took part keeps its last global value
  expert-merging warm-up at steps where ``s % merge_interval == 0`` while
  ``alpha_s > 0`` (every member computes it from the same bits)
The global model is the shared state, so joiners receive it and members stay
bit-identical. Expert ownership is ``experts.expert_holders`` of the member list
agreed at the last sync, so a departed holder's experts move to survivors.

Non-owned experts get ``requires_grad=False`` and ``grad=None``: torch
optimizers skip parameters without a gradient, weight decay included, so they
stay bit-identical between syncs (their optimizer state is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from collectives.api import AllReduceResult, Collective, ReduceOp
from optim.experts import expert_holders, merge_alpha, merge_experts
from optim.flat import FlatParams
from optim.outer import OnPeerLost, OuterLoop, RoundRecord
from peerd.errors import ConfigError, Evicted, PeerLost

Experts = Sequence[Sequence[Sequence[torch.nn.Parameter]]]  # layers x experts x params


class SPES(OuterLoop):
    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        collective: Collective,
        *,
        experts: Experts,
        sync_every: int = 100,
        copies: int = 1,
        merge_interval: int = 500,
        merge_alpha0: float = 0.01,
        merge_decay_steps: int = 10_000,
        merge_neighbours: int = 4,
        joining: bool = False,
        on_peer_lost: OnPeerLost = "retry",
    ) -> None:
        if sync_every < 1 or merge_interval % sync_every:
            raise ConfigError("merge_interval must be a multiple of sync_every (>= 1)")
        if not experts or len({len(layer) for layer in experts}) != 1:
            raise ConfigError("experts must be layers x experts x params, same E per layer")
        super().__init__(
            model, inner_optimizer, collective, joining=joining, on_peer_lost=on_peer_lost
        )
        self.sync_every, self.copies = sync_every, copies
        self.merge_interval, self.merge_alpha0 = merge_interval, merge_alpha0
        self.merge_decay_steps, self.merge_neighbours = merge_decay_steps, merge_neighbours
        self.experts = [[list(ps) for ps in layer] for layer in experts]
        self.num_experts = len(self.experts[0])
        self.space = FlatParams(list(model.parameters()))
        segs = zip(self.space.params, self.space.segments(), strict=True)
        where = {id(p): seg for p, seg in segs}

        def index(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
            return torch.cat([torch.arange(*where[id(p)]) for p in params])

        expert_ids = {id(p) for layer in self.experts for ps in layer for p in ps}
        self.shared_idx = index([p for p in self.space.params if id(p) not in expert_ids])
        self.expert_idx = [[index(ps) for ps in layer] for layer in self.experts]
        self.theta = self.space.read()
        self.me = collective.view().me
        self.holders: list[tuple[str, ...]] = []
        self.start()
        self.assign()

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {"counters": self.counters, "theta": self.theta}

    def load_global(self) -> None:
        self.space.write(self.theta)

    def owned(self, member: str) -> list[int]:
        return [e for e, hs in enumerate(self.holders) if member in hs]

    def assign(self) -> None:
        """Ownership from the members agreed at the last sync; (un)freeze experts."""
        self.holders = expert_holders(self.num_experts, self.members, self.copies)
        mine = set(self.owned(self.me))
        for layer in self.experts:
            for e, params in enumerate(layer):
                for p in params:
                    p.requires_grad_(e in mine)
                    if e not in mine:
                        p.grad = None
                        self.inner_optimizer.state.pop(p, None)

    def _expert_payload(self, local: torch.Tensor, member: str) -> list[torch.Tensor]:
        return [local[self.expert_idx[layer][e]] for layer in range(len(self.experts))
                for e in self.owned(member)]

    def on_step(self) -> RoundRecord | None:
        if self.global_step % self.sync_every:
            return None
        local = self.space.read()
        shared = local[self.shared_idx].clone()
        res: AllReduceResult | None
        try:
            res = self.collective.all_reduce(shared, ReduceOp.AVG, tag="spes/shared",
                                             retry=self.on_peer_lost == "retry")
        except PeerLost as exc:
            self.round_lost(exc)
            res = None
        sent = received = 0
        if res is not None:
            own = torch.cat(self._expert_payload(local, self.me) or [torch.zeros(0)])
            # Always retried, whatever the policy: the shared average above is already
            # committed, and a lost holder's experts just keep their global value.
            try:
                arrays, peers = self.collective.all_gather(own.numpy(), tag="spes/experts")
            except Evicted as exc:  # the others finish this round without this member
                self.round_lost(exc)
                res = None
        if res is not None:
            sent = own.numel() * 4 * (len(peers) - 1)
            received = sum(np.asarray(a).nbytes for a in arrays) - own.numel() * 4
            new = self.theta.clone()
            new[self.shared_idx] = shared
            self._average_experts(new, arrays, peers)
            self._maybe_merge(new)
            self.theta.copy_(new)
            self.counters[0] += 1
            sent += res.bytes_sent
            received += res.bytes_received
        self.load_global()
        if self.sync().tensors_received:
            self.load_global()
        self.assign()
        return self.record(participants=res.participants if res else (), bytes_sent=sent,
                           bytes_received=received, skipped=res is None)

    def _average_experts(self, new: torch.Tensor, arrays: Sequence[object],
                         peers: Sequence[str]) -> None:
        sums: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        for raw, peer in zip(arrays, peers, strict=True):
            flat = torch.from_numpy(np.asarray(raw, dtype=np.float32).copy())
            keys = [(layer, e) for layer in range(len(self.experts)) for e in self.owned(peer)]
            sizes = [self.expert_idx[layer][e].numel() for layer, e in keys]
            if flat.numel() != sum(sizes) or not bool(torch.isfinite(flat).all()):
                continue  # malformed upload: that member's experts count as absent
            for key, part in zip(keys, flat.split(sizes), strict=True):
                acc, n = sums.get(key, (torch.zeros(0), 0))
                sums[key] = (part.clone() if n == 0 else acc.add_(part), n + 1)
        for (layer, e), (acc, n) in sums.items():
            new[self.expert_idx[layer][e]] = acc / float(n) if n > 1 else acc

    def _maybe_merge(self, new: torch.Tensor) -> None:
        s = self.global_step
        alpha = merge_alpha(s, self.merge_alpha0, self.merge_decay_steps)
        if s % self.merge_interval or alpha <= 0.0:
            return
        for layer, idx in enumerate(self.expert_idx):
            vectors = torch.stack([new[i] for i in idx])
            w1_numel = self.experts[layer][0][0].numel()
            merged = merge_experts(vectors, w1_numel, alpha, self.merge_neighbours)
            for i, row in zip(idx, merged, strict=True):
                new[i] = row
