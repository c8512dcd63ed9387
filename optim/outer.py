"""``OuterLoop``: what every outer-loop optimizer shares.

The training loop owns the model and its inner optimizer and calls
``outer.step()`` after every inner ``optimizer.step()``. The outer loop counts
inner steps, runs a communication round when its schedule says so, and keeps
the *shared state* (the fp32 global snapshot, outer-optimizer buffers and
step counters) bit-identical on every member.

Round boundary contract with the ``Collective``: after each round every member
calls ``sync_state`` (the popular state wins). That is where joiners are
admitted and receive the shared state, and where any drift is repaired; a
joiner's first sync is ``RECEIVE_ONLY``.

Failure policy (``on_peer_lost``): ``"retry"`` lets the collective redo a
round over the survivors (the average is over exactly those who took part);
``"skip"`` makes every survivor drop the round when the collective raises
``PeerLost``: local weights are restored from the snapshot, as torchft does.
Under either policy a member that the others went on without (``Evicted``:
stopped or cut off past the heartbeat timeout, or out of line with their
history) drops the round and rejoins at its sync, receiving the run's state
like a joiner; training goes on from the run's step (``global_step`` may jump).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from collectives.api import Collective, SyncResult, SyncStrategy
from peerd.errors import ConfigError, Evicted, PeerLost

OnPeerLost = Literal["retry", "skip"]
# Syncs a member tries in a row while the others go on without it (each
# ``Evicted`` one is followed by a receive-only one that rejoins).
SYNC_ATTEMPTS = 3


@dataclass(frozen=True)
class RoundRecord:
    """One communication round as seen by this member."""

    round: int  # outer round index (fragment syncs count separately in Streaming DiLoCo)
    step: int  # global inner step at which the round finished
    participants: tuple[str, ...]
    bytes_sent: int
    bytes_received: int
    sync_bytes_sent: int
    sync_bytes_received: int
    skipped: bool
    fragment: int = 0


@dataclass(frozen=True)
class OuterStats:
    inner_steps: int
    outer_steps: int
    rounds: int
    rounds_skipped: int
    bytes_sent: int
    bytes_received: int
    revision: int
    members: tuple[str, ...]


class OuterLoop:
    """Base class; subclasses implement ``shared_state``, ``load_global`` and ``on_step``."""

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        collective: Collective,
        *,
        joining: bool = False,
        on_peer_lost: OnPeerLost = "retry",
    ) -> None:
        if on_peer_lost not in ("retry", "skip"):
            raise ConfigError("on_peer_lost must be 'retry' or 'skip'")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.collective = collective
        self.on_peer_lost: OnPeerLost = on_peer_lost
        # [outer steps applied, global inner step]: shared so joiners adopt the schedule.
        self.counters = torch.zeros(2, dtype=torch.int64)
        self.records: list[RoundRecord] = []
        self.members: tuple[str, ...] = ()
        self.revision = 0
        self._receive_only_syncs = 1 if joining else 0
        self.rejoins = 0  # times this member was evicted and rejoined
        self._sync_sent = 0
        self._sync_received = 0
        self._superseded = False

    # -- subclass interface -------------------------------------------------------------------
    def shared_state(self) -> dict[str, torch.Tensor]:
        """Named tensors that must be bit-identical on every member (include counters)."""
        raise NotImplementedError

    def load_global(self) -> None:
        """Overwrite the model's weights from the global snapshot."""
        raise NotImplementedError

    def on_step(self) -> RoundRecord | None:
        """Called after the global inner step counter advanced."""
        raise NotImplementedError

    def local_state(self) -> dict[str, Any]:
        """Per-member state worth checkpointing but never synchronised."""
        return {}

    def load_local_state(self, state: dict[str, Any]) -> None:
        del state

    # -- public API ---------------------------------------------------------------------------
    @property
    def outer_steps(self) -> int:
        return int(self.counters[0])

    @property
    def global_step(self) -> int:
        return int(self.counters[1])

    def start(self) -> SyncResult:
        """First shared-state sync: all members agree on the initial model (joiners receive
        it). Subclass constructors call this once their state exists."""
        res = self.sync()
        self.load_global()
        return res

    def step(self) -> RoundRecord | None:
        """Call after every inner optimizer step; returns a record when a round finished."""
        self.counters[1] += 1
        return self.on_step()

    def round_lost(self, exc: PeerLost) -> None:
        """A round's collective raised ``exc``; returns when this member drops the
        round (the caller then restores what the round would have consumed):
        always when it was evicted, for it rejoins at this round's sync and
        receives the state the others reached, else under the ``"skip"`` policy.
        Under ``"retry"`` the collective already retried: ``exc`` is raised."""
        if isinstance(exc, Evicted):
            self.rejoins += 1
            self._receive_only_syncs = max(self._receive_only_syncs, 1)
            return
        if self.on_peer_lost == "retry":
            raise exc

    def sync(self) -> SyncResult:
        """Round boundary: make the shared state identical (popular state wins).
        A member the others went on without during the sync itself (``Evicted``
        there) rejoins at once, receiving the run's state, as one evicted from
        the round's collective does at this sync."""
        before = self.outer_steps
        for attempt in range(1, SYNC_ATTEMPTS + 1):
            strategy = SyncStrategy.ENFORCE_POPULAR
            if self._receive_only_syncs > 0:
                self._receive_only_syncs -= 1
                strategy = SyncStrategy.RECEIVE_ONLY
            try:
                res = self.collective.sync_state(self.shared_state(), self.outer_steps,
                                                 strategy=strategy)
                break
            except Evicted as exc:
                if attempt == SYNC_ATTEMPTS:
                    raise
                self.round_lost(exc)
        # A sync that moved the outer-step counter of a member with rounds behind
        # it replaced this round with the run's state: the member was evicted
        # (here, or already when its collective failed) and rejoined, or was out
        # of line. Its own round then counts as dropped, even where its collective
        # had completed (an overlapped one, finished before the member stopped).
        self._superseded = bool(self.records) and self.outer_steps != before
        self.members = res.participants
        self.revision = res.revision
        self._sync_sent = res.bytes_sent
        self._sync_received = res.bytes_received
        return res

    def record(
        self,
        *,
        participants: tuple[str, ...],
        bytes_sent: int,
        bytes_received: int,
        skipped: bool,
        fragment: int = 0,
    ) -> RoundRecord:
        """Append a round record; call right after ``sync`` so its bytes are included.
        A round that the sync replaced with the run's state is recorded as skipped,
        with no participants: the round it reports is the run's, which this member
        did not take part in."""
        superseded, self._superseded = self._superseded, False
        rec = RoundRecord(
            round=len(self.records),
            step=self.global_step,
            participants=() if superseded else participants,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            sync_bytes_sent=self._sync_sent,
            sync_bytes_received=self._sync_received,
            skipped=skipped or superseded,
            fragment=fragment,
        )
        self.records.append(rec)
        return rec

    def statistics(self) -> OuterStats:
        return OuterStats(
            inner_steps=self.global_step,
            outer_steps=self.outer_steps,
            rounds=len(self.records),
            rounds_skipped=sum(r.skipped for r in self.records),
            bytes_sent=sum(r.bytes_sent + r.sync_bytes_sent for r in self.records),
            bytes_received=sum(r.bytes_received + r.sync_bytes_received for r in self.records),
            revision=self.revision,
            members=self.members,
        )

    def state_dict(self) -> dict[str, Any]:
        shared = {k: v.detach().clone() for k, v in self.shared_state().items()}
        return {"shared": shared, "local": self.local_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for key, tensor in self.shared_state().items():
                tensor.copy_(state["shared"][key])
        self.load_local_state(state["local"])
        self.load_global()
