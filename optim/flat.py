"""Flat fp32 views of a list of parameters and the outer SGD step.

Outer optimizers keep the global snapshot and their state as one flat fp32
tensor per parameter group, so a round is one collective call and the
update is a handful of element-wise, in-place (hence bit-reproducible) ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FlatParams:
    """A fixed, ordered list of parameters addressed as one flat fp32 vector."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.offsets: list[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.size = total

    def segments(self) -> list[tuple[int, int]]:
        """(start, end) of each parameter inside the flat vector."""
        return [(o, o + n) for o, n in zip(self.offsets, self.numels, strict=True)]

    def read(self) -> torch.Tensor:
        """A fresh fp32 copy of the current parameter values."""
        out = torch.empty(self.size, dtype=torch.float32)
        with torch.no_grad():
            for p, (a, b) in zip(self.params, self.segments(), strict=True):
                out[a:b].copy_(p.detach().reshape(-1))
        return out

    def write(self, flat: torch.Tensor) -> None:
        """Overwrite the parameters with ``flat`` (cast to their dtype)."""
        with torch.no_grad():
            for p, (a, b) in zip(self.params, self.segments(), strict=True):
                p.copy_(flat[a:b].reshape(p.shape))

    def mix(self, glob: torch.Tensor, alpha: float) -> None:
        """params <- alpha * params + (1 - alpha) * glob; alpha = 0 copies glob exactly."""
        if alpha == 0.0:
            self.write(glob)
            return
        local = self.read()
        self.write(torch.lerp(glob, local, alpha))


def outer_sgd_step(
    theta: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    mu: float,
    nesterov: bool,
) -> None:
    """PyTorch SGD semantics (dampening 0, no weight decay), in place.

    ``momentum`` starts as zeros, which makes the first step's ``u = grad``
    exactly as PyTorch's lazily created buffer does, while keeping the buffer
    present (and hence part of the shared state) from the start.
    """
    if mu == 0.0:
        theta.sub_(grad, alpha=lr)
        return
    momentum.mul_(mu).add_(grad)
    step = grad.add(momentum, alpha=mu) if nesterov else momentum
    theta.sub_(step, alpha=lr)
