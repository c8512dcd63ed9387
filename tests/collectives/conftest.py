"""A swarm of engines over one MemNetwork, each killable on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

from collectives.driver import EngineConfig
from collectives.membership import Timing
from collectives.memfabric import MemFabric, MemNetwork
from collectives.run import Engine, open_engine

RUN = "run-1"
FAST = EngineConfig(
    timing=Timing(heartbeat_interval=1.0, heartbeat_timeout=5.0, view_timeout=20.0),
    phase_timeout=30.0,
    sub_chunk_bytes=64,  # 16 fp32 elements per sub-chunk: pipelining is exercised
    probe_bytes=4096,
)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def ids(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


class Swarm:
    def __init__(self, nursery: trio.Nursery, network: MemNetwork, config: EngineConfig) -> None:
        self.nursery = nursery
        self.net = network
        self.config = config
        self.engines: dict[str, Engine] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.fabrics: dict[str, MemFabric] = {}

    async def start(self, peer: str, members: list[str] | None) -> Engine:
        fabric = self.net.add(peer) if peer not in self.fabrics else self.fabrics[peer]

        async def host(task_status: trio.TaskStatus[tuple[Engine, trio.CancelScope]]) -> None:
            with trio.CancelScope() as scope:
                async with open_engine(fabric, RUN, members=members, config=self.config) as eng:
                    task_status.started((eng, scope))
                    await trio.sleep_forever()

        engine, scope = await self.nursery.start(host)
        self.engines[peer] = engine
        self.scopes[peer] = scope
        return engine

    def kill(self, peer: str) -> None:
        self.net.kill(peer)
        self.scopes[peer].cancel()
        del self.engines[peer]

    def alive(self) -> list[str]:
        return sorted(self.engines)


@asynccontextmanager
async def swarm(n: int, config: EngineConfig = FAST) -> AsyncIterator[Swarm]:
    net = MemNetwork()
    async with trio.open_nursery() as nursery:
        s = Swarm(nursery, net, config)
        members = ids(n)
        for p in members:
            s.fabrics[p] = net.add(p)
        for p in members:
            await s.start(p, members)
        yield s
        nursery.cancel_scope.cancel()


def inputs(peers: list[str], n: int, seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(n).astype(dtype) for p in peers}
