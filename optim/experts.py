"""Pure decisions and maths behind SPES: who trains which expert, the merge
warm-up schedule, and the expert-merging step itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def expert_holders(
    num_experts: int, members: Sequence[str], copies: int = 1
) -> list[tuple[str, ...]]:
    """Holders of each expert: ``members[(e + j) % R]`` for ``j < copies``.

    A pure function of the agreed member list, so every member derives the same
    map, and when a holder leaves the next map spreads its experts over the
    survivors: an expert has a trainer as long as any member is left.
    """
    r = len(members)
    if r == 0:
        return [() for _ in range(num_experts)]
    c = max(1, min(copies, r))
    return [tuple(members[(e + j) % r] for j in range(c)) for e in range(num_experts)]


def merge_alpha(step: int, alpha0: float, decay_steps: int) -> float:
    """alpha_s = alpha0 * max(0, 1 - s / T_decay): the warm-up ends at T_decay."""
    if decay_steps <= 0:
        return 0.0
    return alpha0 * max(0.0, 1.0 - step / decay_steps)


def merge_experts(
    vectors: torch.Tensor, w1_numel: int, alpha: float, neighbours: int = 4
) -> torch.Tensor:
    """One layer's expert-merging step (simultaneous, order independent).

    ``vectors`` is (E, P_e): each row one expert's parameters, its w1 first.
    For each expert i, N_i are the ``neighbours`` other experts whose w1 is
    most similar in cosine (ties to the lower index), and
    ``v_i <- v_i + alpha * mean_{j in N_i} (v_j - v_i)``, all read from the
    pre-merge rows. Returns a new tensor.
    """
    e = vectors.shape[0]
    k = min(neighbours, e - 1)
    if alpha == 0.0 or k <= 0:
        return vectors.clone()
    w1 = vectors[:, :w1_numel]
    unit = w1 / w1.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("-inf"))
    order = torch.argsort(-sim, dim=1, stable=True)[:, :k]
    mean_nb = vectors[order].mean(dim=1)
    return vectors + alpha * (mean_nb - vectors)
