"""Streaming DiLoCo (Douillard et al. 2025): fragments on a staggered schedule,
communication overlapped with ``overlap`` inner steps, mixing, 4-bit payloads.

Schedule (shared global step ``s``, 1-based; cycle ``L = sync_every / F``):
the fragment ``p = (s + overlap) / L - 1 mod F`` is *sent* at steps where
``(s + overlap) % L == 0`` and *received* ``overlap`` steps later, so each
fragment syncs once every ``sync_every`` steps, fragments are ``L`` apart and
at most one is in flight. On receive: ``theta_p <- OuterOpt_p(theta_p, avg)``,
then ``local_p <- alpha * local_p + (1 - alpha) * theta_p``; the next delta of
``p`` is measured against ``theta_p`` (post outer step, never the mixed value).

Fragments default to a strided split of ``model.blocks`` (block i goes to
fragment i mod F); every parameter outside the blocks (embeddings, final norm,
head) joins fragment 0. With ``quant="e3m0"`` each member all-gathers its 4-bit
encoded delta and the decoded deltas are averaged in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from collectives.api import Collective
from optim.exchange import Pending, start_dense, start_gather
from optim.flat import FlatParams, outer_sgd_step
from optim.lowbit import e3m0_decode, e3m0_encode
from optim.outer import OnPeerLost, OuterLoop, RoundRecord
from peerd.errors import ConfigError, Evicted, PeerLost


def strided_fragments(model: torch.nn.Module, n: int) -> list[list[torch.nn.Parameter]]:
    """Block i of ``model.blocks`` -> fragment i % n; other parameters -> fragment 0.
    A model without ``blocks`` is split parameter by parameter, strided."""
    blocks = getattr(model, "blocks", None)
    frags: list[list[torch.nn.Parameter]] = [[] for _ in range(n)]
    in_blocks: set[int] = set()
    if not isinstance(blocks, torch.nn.ModuleList):
        for i, p in enumerate(model.parameters()):
            frags[i % n].append(p)
            in_blocks.add(id(p))
    else:
        for i, block in enumerate(blocks):
            for p in block.parameters():
                frags[i % n].append(p)
                in_blocks.add(id(p))
    frags[0][:0] = [p for p in model.parameters() if id(p) not in in_blocks]
    if any(not f for f in frags):
        raise ConfigError(f"cannot split the model into {n} non-empty fragments")
    return frags


class StreamingDiLoCo(OuterLoop):
    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        collective: Collective,
        *,
        fragments: int | Sequence[Sequence[torch.nn.Parameter]] = 2,
        sync_every: int = 100,
        overlap: int = 1,
        alpha: float = 0.5,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        quant: Literal["e3m0"] | None = "e3m0",
        joining: bool = False,
        on_peer_lost: OnPeerLost = "retry",
    ) -> None:
        frags = strided_fragments(model, fragments) if isinstance(fragments, int) else fragments
        n = len(frags)
        if n < 1 or sync_every % n or sync_every < n:
            raise ConfigError("sync_every must be a positive multiple of the fragment count")
        if not 0 <= overlap < sync_every // n:
            raise ConfigError("overlap must satisfy 0 <= overlap < sync_every / fragments")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError("alpha must lie in [0, 1]")
        super().__init__(
            model, inner_optimizer, collective, joining=joining, on_peer_lost=on_peer_lost
        )
        self.sync_every, self.overlap, self.alpha = sync_every, overlap, alpha
        self.outer_lr, self.mu, self.nesterov, self.quant = outer_lr, momentum, nesterov, quant
        self.cycle = sync_every // n
        self.spaces = [FlatParams(list(f)) for f in frags]
        self.thetas = [s.read() for s in self.spaces]
        self.moms = [torch.zeros_like(t) for t in self.thetas]
        self._in_flight: tuple[int, Pending] | None = None
        self.start()

    @property
    def num_fragments(self) -> int:
        return len(self.spaces)

    def shared_state(self) -> dict[str, torch.Tensor]:
        state = {"counters": self.counters}
        for p, (theta, mom) in enumerate(zip(self.thetas, self.moms, strict=True)):
            state[f"theta/{p}"] = theta
            state[f"momentum/{p}"] = mom
        return state

    def load_global(self) -> None:
        for space, theta in zip(self.spaces, self.thetas, strict=True):
            space.write(theta)

    def fragment_sent_at(self, s: int) -> int | None:
        """The fragment whose delta is sent at global step ``s`` (None if none)."""
        if (s + self.overlap) % self.cycle:
            return None
        return ((s + self.overlap) // self.cycle - 1) % self.num_fragments

    def on_step(self) -> RoundRecord | None:
        s = self.global_step
        rec = None
        if self._in_flight is not None and s % self.cycle == 0:
            rec = self._receive()
        p = self.fragment_sent_at(s)
        if p is not None:
            self._send(p)
            if self.overlap == 0:
                rec = self._receive()
        return rec

    def _send(self, p: int) -> None:
        delta = self.thetas[p] - self.spaces[p].read()
        retry = self.on_peer_lost == "retry"
        tag = f"streaming/{p}"
        if self.quant is None:
            pending = start_dense(self.collective, delta, tag=tag, retry=retry)
        else:
            n = delta.numel()
            pending = start_gather(
                self.collective, e3m0_encode(delta), lambda raw: e3m0_decode(raw, n),
                tag=tag, background=self.overlap > 0, retry=retry,
            )
        self._in_flight = (p, pending)

    def _receive(self) -> RoundRecord:
        assert self._in_flight is not None
        p, pending = self._in_flight
        self._in_flight = None
        try:
            avg = pending.finish()
        except PeerLost as exc:
            if self.quant is None or isinstance(exc, Evicted):
                self.round_lost(exc)
            avg = None
        if avg is None:  # every survivor drops this fragment's round
            self.spaces[p].write(self.thetas[p])
        else:
            outer_sgd_step(self.thetas[p], self.moms[p], avg.value, lr=self.outer_lr, mu=self.mu,
                           nesterov=self.nesterov)
            self.counters[0] += 1
            self.spaces[p].mix(self.thetas[p], self.alpha)
        if self.sync().tensors_received:
            self.load_global()
        return self.record(
            participants=avg.participants if avg else (),
            bytes_sent=avg.bytes_sent if avg else 0,
            bytes_received=avg.bytes_received if avg else 0,
            skipped=avg is None,
            fragment=p,
        )
