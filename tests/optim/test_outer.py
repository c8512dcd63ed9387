"""What every outer loop records when a round boundary hands it the run's state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives.api import SyncResult, SyncStrategy
from collectives.local import LocalGroup
from examples import toy
from optim import DelayedDiLoCo, DiLoCo, SparseLoCo, StreamingDiLoCo
from optim.outer import OuterLoop
from peerd.errors import Evicted

torch.set_num_threads(1)

AHEAD = 5  # outer steps the run went on while this member was away


class _RejoinAtSync:
    """A one-member collective whose ``at``-th ``sync_state`` hands the member
    the run's state as a rejoin does, the others having gone on ``AHEAD``
    outer steps without it. Every collective before it completed, with this
    member: as an overlapped round in flight when the member stopped does."""

    def __init__(self, inner: Any, at: int, steps_per_outer: int,
                 evicted_first: bool = False) -> None:
        self.inner, self.at, self.steps_per_outer, self.calls = inner, at, steps_per_outer, 0
        # The sync before is the one the others went on without this member in.
        self.evicted_first = evicted_first
        self.strategies: list[SyncStrategy] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sync_state(self, state: Any, revision: int, *,
                   strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR) -> SyncResult:
        self.calls += 1
        self.strategies.append(strategy)
        if self.evicted_first and self.calls == self.at - 1:
            raise Evicted("m0", "test: the others went on without it during the sync")
        res: SyncResult = self.inner.sync_state(state, revision, strategy=strategy)
        if self.calls != self.at:
            return res
        with torch.no_grad():
            state["counters"] += torch.tensor([AHEAD, AHEAD * self.steps_per_outer])
        return SyncResult(res.revision, res.participants, ("counters",), 16, 0)


def steps_per_outer(kw: dict[str, Any]) -> int:
    return int(kw["sync_every"] // kw.get("fragments", 1))


def _train(cls: type[OuterLoop], steps: int, at: int, **kw: Any) -> OuterLoop:
    model = toy.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    coll = _RejoinAtSync(LocalGroup(1).member(0), at, steps_per_outer(kw))
    outer = cls(model, opt, coll, **kw)
    for s in range(steps):
        toy.inner_step(model, opt, 0, s)
        outer.step()
    return outer


@pytest.mark.parametrize(("cls", "kw"), [
    (DiLoCo, {"sync_every": 2}),
    (DelayedDiLoCo, {"sync_every": 2}),
    (SparseLoCo, {"sync_every": 2}),
    (StreamingDiLoCo, {"sync_every": 4, "fragments": 2, "overlap": 1}),
])
def test_a_round_replaced_by_the_runs_state_is_recorded_as_dropped(
        cls: type[OuterLoop], kw: dict[str, Any]) -> None:
    # Sync 1 is the start's; sync 3 ends the member's second round: its
    # collective completed, but the sync moved it AHEAD outer steps on.
    outer = _train(cls, steps=12, at=3, **kw)
    second = outer.records[1]
    assert second.skipped and second.participants == ()
    assert second.sync_bytes_received > 0
    # The record reports the run's step, not the one the member computed.
    first, every = outer.records[0].step, steps_per_outer(kw)
    assert first == every and second.step == first + (AHEAD + 1) * every
    # The rounds after it are the member's own again, with the collective's participants.
    assert not outer.records[0].skipped
    rest = outer.records[2:]
    assert rest and all(not r.skipped and r.participants for r in rest), outer.records


def test_a_member_evicted_during_the_sync_rejoins_in_it() -> None:
    """Left out while the sync itself agreed (a restarted daemon admitted just
    before the others noticed its restart): the loop syncs again, receive-only,
    and goes on from the run's state instead of failing the training."""
    model = toy.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    coll = _RejoinAtSync(LocalGroup(1).member(0), 4, 2, evicted_first=True)
    outer = DiLoCo(model, opt, coll, sync_every=2)  # type: ignore[arg-type]
    for s in range(8):
        toy.inner_step(model, opt, 0, s)
        outer.step()
    # Sync 3 (the second round's) raised; sync 4 rejoined it, receiving the run's state.
    assert coll.strategies[2:4] == [SyncStrategy.ENFORCE_POPULAR, SyncStrategy.RECEIVE_ONLY]
    assert outer.rejoins == 1
    second = outer.records[1]
    assert second.skipped and second.participants == () and second.step == 2 + (AHEAD + 1) * 2
    assert [r.skipped for r in outer.records] == [False, True, False, False]


def test_a_normal_round_is_not_marked_dropped() -> None:
    outer = _train(DiLoCo, steps=8, at=0, sync_every=2)  # no sync replaces anything
    assert len(outer.records) == 4
    assert all(not r.skipped and len(r.participants) == 1 for r in outer.records)
