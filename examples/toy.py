"""A tiny deterministic regression problem for optimizer unit tests.

Each worker sees its own stream of batches, fixed by (worker, step), so a
test can replay exactly the batches any member used.
"""

from __future__ import annotations

import threading

import torch

# torch.manual_seed is process-global: member threads must not interleave their inits.
INIT_LOCK = threading.Lock()

IN_DIM = 6
OUT_DIM = 3


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with INIT_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(IN_DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, OUT_DIM)
        ).to(dtype)


def batch(
    worker: int, step: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * worker + step)
    x = torch.randn(16, IN_DIM, generator=g, dtype=dtype)
    w = torch.linspace(-1.0, 1.0, IN_DIM * OUT_DIM, dtype=dtype).reshape(IN_DIM, OUT_DIM)
    y = torch.tanh(x @ w) + 0.01 * torch.randn(16, OUT_DIM, generator=g, dtype=dtype)
    return x, y


def loss_on(model: torch.nn.Module, worker: int, step: int) -> torch.Tensor:
    x, y = batch(worker, step, next(model.parameters()).dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def inner_step(model: torch.nn.Module, opt: torch.optim.Optimizer, worker: int, step: int) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_on(model, worker, step)
    loss.backward()
    opt.step()
    return float(loss.detach())
