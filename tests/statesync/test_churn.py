"""Randomized churn: joins, kills (between and during syncs) and graceful
leaves; after every sync all live peers hold bit-identical state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import trio
import trio.testing

from collectives.api import SyncResult, SyncStrategy
from collectives.memfabric import LinkModel, MemNetwork
from collectives.statesync import StateSync

from .conftest import FAST, Swarm, digest_of, ids, make_state

SIZES = {"emb": 300_000, "head": 5000, "step": 1}  # emb spans 2 pieces


def can_lose_one(s: Swarm) -> bool:
    """Whether one more member may go while a strict majority of the newest
    view survives (a view change needs a quorum of the members it replaces)."""
    views = [e.core.view for e in s.engines.values() if e.core.view is not None]
    view = max(views, key=lambda d: d.revision)
    alive = [p for p in view.members if p in s.engines]
    return 2 * (len(alive) - 1) > len(view.members)


async def sync_round(
    s: Swarm, states: dict[str, dict[str, np.ndarray]], rnd: int, members: list[str],
    joiner: str | None, kill_at: float | None, rng: random.Random, log: list[str],
) -> dict[str, SyncResult | Exception]:
    """Every member (and the joiner, once its request is pending) syncs; with
    ``kill_at`` one member is killed that many seconds into the sync."""
    out: dict[str, SyncResult | Exception] = {}

    async def run(p: str, strategy: SyncStrategy) -> None:
        with trio.CancelScope() as scope:
            s.task_scopes.setdefault(p, []).append(scope)
            try:
                out[p] = await StateSync.of(s.engines[p]).sync(states[p], rnd, strategy)
            except Exception as exc:  # recorded, judged by the caller
                out[p] = exc

    async with trio.open_nursery() as inner:
        if joiner is not None:
            engine = await s.start(joiner, None)
            inner.start_soon(run, joiner, SyncStrategy.RECEIVE_ONLY)
            while not any(engine.me in s.engines[p].core.joiners(trio.current_time())
                          for p in members):
                await trio.sleep(0.1)
        for p in members:
            inner.start_soon(run, p, SyncStrategy.ENFORCE_POPULAR)
        if kill_at is not None and len(members) > 2 and can_lose_one(s):
            await trio.sleep(kill_at)
            victim = rng.choice(members)
            s.kill(victim)
            log.append(f"{rnd}: kill {victim} during sync")
    return out


async def churn(seed: int, rounds: int) -> list[str]:
    """Run ``rounds`` sync rounds under random churn; returns the event log."""
    rng = random.Random(seed)
    log: list[str] = []
    # 100 MB/s links with 1 ms latency: transfers take (virtual) time, so a
    # kill can land in the middle of one.
    net = MemNetwork(LinkModel(latency=0.001, bandwidth=100e6))
    base = make_state(seed, SIZES)
    async with trio.open_nursery() as nursery:
        s = Swarm(nursery, net, FAST)
        states = {p: {k: v.copy() for k, v in base.items()} for p in ids(4)}
        for p in ids(4):
            s.add_fabric(p)
        for p in ids(4):
            await s.start(p, ids(4))
        next_id = 4
        for rnd in range(1, rounds + 1):
            alive = s.alive()
            action = rng.choice(["join", "kill", "kill_during", "leave", "drift"])
            if action == "kill" and len(alive) > 2 and can_lose_one(s):
                victim = rng.choice(alive)
                s.kill(victim)
                log.append(f"{rnd}: kill {victim}")
            elif action == "leave" and len(alive) > 2 and can_lose_one(s):
                victim = rng.choice(alive)
                await s.engines[victim].leave()
                s.scopes.pop(victim).cancel()
                del s.engines[victim]
                log.append(f"{rnd}: leave {victim}")
            elif action == "drift":
                log.append(f"{rnd}: drift only")
            joiner = None
            if action == "join" or len(alive) <= 2:
                joiner = f"p{next_id:02d}"
                next_id += 1
                states[joiner] = {k: np.zeros_like(v) for k, v in base.items()}
                log.append(f"{rnd}: join {joiner}")
            # some members drift in one tensor (a minority: the popular state survives)
            members = s.alive()
            for p in rng.sample(members, k=(len(members) - 1) // 2):
                name = rng.choice(sorted(SIZES))
                states[p][name][rng.randrange(SIZES[name])] += 1.0
            kill_at = rng.uniform(0.0, 0.02) if action == "kill_during" else None
            out = await sync_round(s, states, rnd, members, joiner, kill_at, rng, log)
            live = s.alive()
            results = {p: out[p] for p in live}
            bad = {p: r for p, r in results.items() if not isinstance(r, SyncResult)}
            assert not bad, (log, bad)
            views = {r.participants for r in results.values() if isinstance(r, SyncResult)}
            assert len(views) == 1, (log, views)
            digests = {p: tuple(sorted(digest_of(states[p]).items())) for p in live}
            assert len(set(digests.values())) == 1, (log, rnd)
        nursery.cancel_scope.cancel()
    return log


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_churn_keeps_live_peers_identical(
    seed: int, mock_clock: trio.testing.MockClock
) -> None:
    log = await churn(seed, rounds=8)
    kinds = {line.split(": ")[1].split()[0] for line in log}
    assert len(kinds) >= 3, log  # churn did happen, of several kinds


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 20))
async def test_churn_long(seed: int, mock_clock: trio.testing.MockClock) -> None:
    await churn(seed, rounds=30)
