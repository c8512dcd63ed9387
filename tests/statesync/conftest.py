"""Engines over one MemNetwork, each killable; helpers for shared-state tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from collectives.driver import EngineConfig
from collectives.membership import Timing
from collectives.memfabric import MemFabric, MemNetwork
from collectives.run import Engine, open_engine
from collectives.statebuf import capture, describe
from peerd.errors import PeerdError

RUN = "run-s"
FAST = EngineConfig(
    timing=Timing(heartbeat_interval=1.0, heartbeat_timeout=5.0, view_timeout=20.0),
    phase_timeout=30.0,
    sub_chunk_bytes=64,
    probe_bytes=4096,
)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def ids(n: int, first: int = 0) -> list[str]:
    return [f"p{i:02d}" for i in range(first, first + n)]


class Swarm:
    def __init__(self, nursery: trio.Nursery, net: MemNetwork, config: EngineConfig) -> None:
        self.nursery = nursery
        self.net = net
        self.config = config
        self.engines: dict[str, Engine] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.fabrics: dict[str, Any] = {}
        self.tasks: dict[str, list[trio.CancelScope]] = {}

    def add_fabric(self, peer: str, wrap: Callable[[MemFabric], Any] | None = None) -> None:
        fabric = self.net.add(peer)
        self.fabrics[peer] = wrap(fabric) if wrap else fabric

    async def start(self, peer: str, members: list[str] | None) -> Engine:
        if peer not in self.fabrics:
            self.add_fabric(peer)
        fabric = self.fabrics[peer]

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
        self.scopes.pop(peer).cancel()
        for scope in self.tasks.pop(peer, []):
            scope.cancel()
        del self.engines[peer]

    async def each(self, fn: Callable[[str, Engine], Awaitable[Any]],
                   peers: list[str] | None = None) -> dict[str, Any]:
        """Run ``fn`` on every (given) live peer at once; peerd errors become
        values; a peer killed meanwhile is left out."""
        out: dict[str, Any] = {}

        async def one(peer: str, engine: Engine) -> None:
            with trio.CancelScope() as scope:
                self.tasks.setdefault(peer, []).append(scope)
                try:
                    out[peer] = await fn(peer, engine)
                except PeerdError as exc:
                    out[peer] = exc

        async with trio.open_nursery() as nursery:
            for peer in peers if peers is not None else self.alive():
                nursery.start_soon(one, peer, self.engines[peer])
        return {p: v for p, v in out.items() if p in self.engines}

    def alive(self) -> list[str]:
        return sorted(self.engines)


@asynccontextmanager
async def swarm(n: int, config: EngineConfig = FAST,
                wrap: dict[str, Callable[[MemFabric], Any]] | None = None) -> AsyncIterator[Swarm]:
    net = MemNetwork()
    async with trio.open_nursery() as nursery:
        s = Swarm(nursery, net, config)
        members = ids(n)
        for p in members:
            s.add_fabric(p, (wrap or {}).get(p))
        for p in members:
            await s.start(p, members)
        yield s
        nursery.cancel_scope.cancel()


def make_state(seed: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(n).astype(np.float32) for name, n in sizes.items()}


def digest_of(state: dict[str, Any]) -> dict[str, bytes]:
    """Per-tensor content digests (what sync compares)."""
    return {n: describe(r).digest for n, r in capture(state).items()}


class CorruptingFabric:
    """A fabric that flips one byte of every state piece it serves."""

    def __init__(self, inner: MemFabric) -> None:
        self._inner = inner
        self.corrupted = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def me(self) -> str:
        return self._inner.me

    async def send_data(self, peer: str, key: bytes, data: Any) -> None:
        if key.startswith(b"ss/") and key[-1:].isdigit():  # a piece, not a control message
            buf = bytearray(data)
            if buf:
                buf[len(buf) // 2] ^= 0xFF
                self.corrupted += 1
            data = bytes(buf)
        await self._inner.send_data(peer, key, data)
