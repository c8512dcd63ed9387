"""DiLoCo (Douillard et al. 2023) and its one-step-delayed variant (PCCL).

Every ``sync_every`` inner steps each member computes the pseudo-gradient
``delta = theta - local`` (old minus new, so it points uphill like a gradient),
the members average it with one all-reduce, and the fp32 global snapshot takes
an outer SGD step (Nesterov by default): ``theta <- theta - lr * g``. With
``outer_lr=1, momentum=0`` this is exactly model averaging. The inner
optimizer's state is local and never reset.
"""

from __future__ import annotations

from typing import Any

import torch

from collectives.api import AllReduceResult, Collective, Handle, Quant, ReduceOp
from optim.flat import FlatParams, outer_sgd_step
from optim.outer import OnPeerLost, OuterLoop, RoundRecord
from peerd.errors import ConfigError, PeerLost


class DiLoCo(OuterLoop):
    """Synchronous DiLoCo: the all-reduce blocks training once per round."""

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        collective: Collective,
        *,
        sync_every: int = 100,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        quant: Quant = Quant.NONE,
        joining: bool = False,
        on_peer_lost: OnPeerLost = "retry",
    ) -> None:
        if sync_every < 1:
            raise ConfigError("sync_every must be >= 1")
        super().__init__(
            model, inner_optimizer, collective, joining=joining, on_peer_lost=on_peer_lost
        )
        self.sync_every = sync_every
        self.outer_lr = outer_lr
        self.mu = momentum
        self.nesterov = nesterov
        self.quant = quant
        self.space = FlatParams(list(model.parameters()))
        self.theta = self.space.read()
        self.momentum = torch.zeros_like(self.theta)
        self.start()

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {"counters": self.counters, "theta": self.theta, "momentum": self.momentum}

    def load_global(self) -> None:
        self.space.write(self.theta)

    def on_step(self) -> RoundRecord | None:
        if self.global_step % self.sync_every != 0:
            return None
        return self.round()

    def pseudo_gradient(self) -> torch.Tensor:
        """theta - fp32(local): old minus new."""
        return self.theta - self.space.read()

    def apply_outer(self, delta: torch.Tensor) -> None:
        outer_sgd_step(
            self.theta, self.momentum, delta, lr=self.outer_lr, mu=self.mu, nesterov=self.nesterov
        )
        self.counters[0] += 1

    def reduce(self, delta: torch.Tensor) -> AllReduceResult | None:
        """Average ``delta`` in place; None when the round is skipped after a loss."""
        try:
            return self.collective.all_reduce(
                delta,
                ReduceOp.AVG,
                tag="diloco",
                quant=self.quant,
                retry=self.on_peer_lost == "retry",
            )
        except PeerLost as exc:
            self.round_lost(exc)
            return None

    def round(self) -> RoundRecord:
        delta = self.pseudo_gradient()
        res = self.reduce(delta)
        if res is not None:
            self.apply_outer(delta)
        # Skipped or not, every member restarts from the (possibly unchanged) snapshot.
        self.load_global()
        if self.sync().tensors_received:
            self.load_global()
        return self.record(
            participants=res.participants if res else (),
            bytes_sent=res.bytes_sent if res else 0,
            bytes_received=res.bytes_received if res else 0,
            skipped=res is None,
        )


class DelayedDiLoCo(DiLoCo):
    """One-step-delayed DiLoCo: round t's all-reduce runs during round t+1's inner steps.

    At the end of round t the member waits for the average of round t-1, measures
    its own ``delta_t`` against the snapshot *before* that average is applied,
    applies it, and starts reducing ``delta_t`` in the background. Rounds 0 and 1
    both start from theta_0; from then on ``theta_{t+1} = OuterOpt(theta_t,
    mean delta_{t-1})``. Call ``flush()`` after the last step to apply the final
    in-flight average.
    """

    def __init__(self, *args: Any, joining: bool = False, **kwargs: Any) -> None:
        self._pending: tuple[Handle, torch.Tensor] | None = None
        super().__init__(*args, joining=joining, **kwargs)
        # A joiner did not take part in the reduce in flight when it arrived, so its
        # second sync (after the others applied that average) must also only receive.
        self._receive_only_syncs = 1 if joining else 0

    def _wait_pending(self) -> tuple[AllReduceResult | None, torch.Tensor | None]:
        if self._pending is None:
            return None, None
        handle, buf = self._pending
        self._pending = None
        try:
            return handle.wait(), buf
        except PeerLost as exc:
            # An evicted member's reduce in flight also fails after it rejoined
            # (started before that), so it receives at the next sync too, as a
            # joiner does.
            self.round_lost(exc)
            return None, None

    def round(self) -> RoundRecord:
        res, avg = self._wait_pending()
        delta = self.pseudo_gradient()  # against theta_t, before avg(delta_{t-1}) is applied
        if res is not None and avg is not None:
            self.apply_outer(avg)
        self.load_global()
        handle = self.collective.all_reduce_async(
            delta, ReduceOp.AVG, tag="diloco", quant=self.quant,
            retry=self.on_peer_lost == "retry",
        )
        self._pending = (handle, delta)
        # The sync comes after the reduce starts, so members admitted here take part from
        # the next reduce on: they measure their first delta against the theta they
        # receive now, exactly like everyone else.
        if self.sync().tensors_received:
            self.load_global()
        return self.record(
            participants=res.participants if res else (),
            bytes_sent=res.bytes_sent if res else 0,
            bytes_received=res.bytes_received if res else 0,
            skipped=res is None and len(self.records) > 0,
        )

    def flush(self) -> RoundRecord | None:
        """Wait for the in-flight average and apply it (end of training)."""
        if self._pending is None:
            return None
        res, avg = self._wait_pending()
        if res is not None and avg is not None:
            self.apply_outer(avg)
        self.load_global()
        self.sync()
        return self.record(
            participants=res.participants if res else (),
            bytes_sent=res.bytes_sent if res else 0,
            bytes_received=res.bytes_received if res else 0,
            skipped=res is None,
        )
