"""A tiny mixture-of-experts GPT: every block's MLP is ``n_experts`` experts with
top-k routing and a Switch-style load-balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from examples.tiny_gpt import INIT_LOCK, MLP, Block, GPTConfig, TinyGPT

LOAD_BALANCE_WEIGHT = 0.01


@dataclass(frozen=True)
class MoEConfig(GPTConfig):
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(cfg.d_model, cfg.expert_hidden) for _ in range(cfg.n_experts)
        )
        self.balance = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        n_exp = len(self.experts)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        # Switch Transformer balance loss: n_exp * sum_e (token share_e * mean prob_e).
        share = F.one_hot(chosen, n_exp).float().sum(dim=(0, 1)) / chosen.numel()
        self.balance = n_exp * (share * probs.mean(dim=0)).sum()
        return out.reshape(x.shape)


class TinyMoE(TinyGPT):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg, [Block(cfg, MoE(cfg)) for _ in range(cfg.n_layer)])

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def expert_params(self) -> list[list[list[nn.Parameter]]]:
        """layers x experts x parameters; each expert's first parameter is its w1."""
        return [[list(e.parameters()) for e in layer.experts] for layer in self.moe_layers()]

    def aux_loss(self) -> torch.Tensor:
        return LOAD_BALANCE_WEIGHT * sum(
            (m.balance for m in self.moe_layers()), torch.zeros(())
        )


def make_moe(cfg: MoEConfig, seed: int = 0) -> TinyMoE:
    with INIT_LOCK:
        torch.manual_seed(seed)
        return TinyMoE(cfg)
