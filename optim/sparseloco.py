"""SparseLoCo (Sarfi et al. 2025): error feedback + chunked top-k + 2-bit values,
aggregated sparsely through an all-gather of (index, value) payloads.

Round (every ``sync_every`` inner steps), per member:
  delta = theta - local                       (old minus new)
  e <- beta * e + delta                       (EF accumulator; local, never shared)
  payload = top-k per chunk of e, 2-bit quantised; e_hat = decode(payload)
  e <- e - e_hat                              (the *decoded* value, so the
                                               quantisation error is fed back too)
  all_gather payloads; avg = per-index mean of the e_hat_r over the members
                                               that sent that index ("index_mean",
                                               default), or sum_r e_hat_r / R
                                               ("peers": the paper's formula)
  theta <- theta - outer_lr * avg; local <- theta
No outer momentum. The aggregation sums peers in view order into dense fp32
buffers, so every member computes the same bits.

Why "index_mean" by default: with 1/R, an index that one member picked moves
by a quarter of that member's value (R=4) and the other members' EF only
catch up rounds later; in a short run from scratch (the benchmark: 12 rounds)
the global model then lags far behind (held-out loss 2.75 vs 2.63 with the
per-index mean, benchmarks/optim_quality.py, 180 steps, H=15). templar's
production aggregation is this per-index mean (docs/optimizers.md §3.2 step
10). Where every member sends every index (100% density) both rules are the
same bits, so the equivalence with DiLoCo's outer SGD holds either way.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from collectives.api import Collective
from optim import sparse_codec
from optim.exchange import Averaged, gather_average
from optim.flat import FlatParams, outer_sgd_step
from optim.outer import OnPeerLost, OuterLoop, RoundRecord
from peerd.errors import ConfigError, PeerLost


class SparseLoCo(OuterLoop):
    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        collective: Collective,
        *,
        sync_every: int = 30,
        outer_lr: float = 1.0,
        beta: float = 0.95,
        chunk: int = 4096,
        density: float = 1 / 64,
        bits: int | None = 2,
        aggregate: Literal["index_mean", "peers"] = "index_mean",
        joining: bool = False,
        on_peer_lost: OnPeerLost = "retry",
    ) -> None:
        if sync_every < 1:
            raise ConfigError("sync_every must be >= 1")
        if bits not in (2, None):
            raise ConfigError("bits must be 2 or None (fp32 values)")
        if aggregate not in ("index_mean", "peers"):
            raise ConfigError("aggregate must be 'index_mean' or 'peers'")
        super().__init__(
            model, inner_optimizer, collective, joining=joining, on_peer_lost=on_peer_lost
        )
        self.sync_every, self.outer_lr, self.beta, self.bits = sync_every, outer_lr, beta, bits
        self.aggregate = aggregate
        self.space = FlatParams(list(model.parameters()))
        self.layouts = sparse_codec.plan(self.space.segments(), chunk, density)
        self.theta = self.space.read()
        self.error = torch.zeros_like(self.theta)
        self.rejected = 0
        self.start()

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {"counters": self.counters, "theta": self.theta}

    def load_global(self) -> None:
        self.space.write(self.theta)

    def local_state(self) -> dict[str, Any]:
        return {"error": self.error.clone()}

    def load_local_state(self, state: dict[str, Any]) -> None:
        self.error.copy_(state["error"])

    def decode_dense(self, raw: np.ndarray) -> torch.Tensor:
        """A payload as a dense fp32 vector (``ProtocolError`` if malformed); for
        "index_mean" the values are followed by a 0/1 vector of the indices sent."""
        idx, vals = sparse_codec.decode(raw, self.layouts, self.bits)
        n = self.space.size
        if self.aggregate == "peers":
            return torch.zeros(n).index_add_(0, idx, vals)
        out = torch.zeros(2 * n)
        out.index_add_(0, idx, vals)
        out[n + idx] = 1.0
        return out

    def combine(self, avg: torch.Tensor) -> torch.Tensor:
        """The update from the average of ``decode_dense`` outputs. Both halves are
        divided by the same member count, so values / counts is the per-index mean
        over the members that sent the index (0 where none did)."""
        if self.aggregate == "peers":
            return avg
        n = self.space.size
        vals, counts = avg[:n], avg[n:]
        return torch.where(counts > 0, vals / counts.clamp_min(1e-30), torch.zeros(()))

    def compress(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Encode the EF buffer and subtract what the peers will decode from it."""
        payload = sparse_codec.encode(self.error, self.layouts, self.bits)
        idx, vals = sparse_codec.decode(payload, self.layouts, self.bits)
        self.error[idx] -= vals
        return payload, idx, vals

    def on_step(self) -> RoundRecord | None:
        if self.global_step % self.sync_every:
            return None
        delta = self.theta - self.space.read()
        self.error.mul_(self.beta).add_(delta)
        payload, idx, vals = self.compress()
        avg: Averaged | None
        try:
            avg = gather_average(self.collective, payload, self.decode_dense, tag="sparseloco",
                                 retry=self.on_peer_lost == "retry")
        except PeerLost as exc:
            self.round_lost(exc)
            avg = None
            self.error[idx] += vals  # nobody applied it: keep it for the next round
        if avg is not None:
            self.rejected += avg.rejected
            outer_sgd_step(self.theta, self.theta, self.combine(avg.value), lr=self.outer_lr,
                           mu=0.0, nesterov=False)
            self.counters[0] += 1
        self.load_global()
        if self.sync().tensors_received:
            self.load_global()
        return self.record(
            participants=avg.participants if avg else (),
            bytes_sent=avg.bytes_sent if avg else 0,
            bytes_received=avg.bytes_received if avg else 0,
            skipped=avg is None,
        )
