"""A swarm of engines over one MemNetwork, each killable on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from collectives.driver import EngineConfig
from collectives.membership import Membership, Timing
from collectives.memfabric import MemFabric, MemNetwork
from collectives.run import Engine, open_engine
from collectives.view import Decision
from peerd.errors import Evicted, PeerdError

RUN = "run-1"
FAST = EngineConfig(
    timing=Timing(heartbeat_interval=1.0, heartbeat_timeout=5.0, view_timeout=20.0),
    phase_timeout=30.0,
    sub_chunk_bytes=64,  # 16 fp32 elements per sub-chunk: pipelining is exercised
    probe_bytes=4096,
    # Inline whatever the cores: a mock clock jumps ahead while a task waits on
    # a worker thread (tests/collectives/test_allreduce.py covers the threads).
    worker_threads=False,
)


@pytest.fixture
def one_view_per_revision(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, set[Decision]]]:
    """The test ends by checking that all peers that installed a view of some
    revision with themselves in it installed the same one
    (``collectives.ballot``). (A leaver's own view of its departure leaves
    it out, and is nobody else's.)"""
    installed: dict[int, set[Decision]] = {}
    install = Membership.install

    def recording(self: Membership, decision: Decision, now: float) -> bool:
        new = install(self, decision, now)
        if new and self.me in decision.members:
            installed.setdefault(decision.revision, set()).add(decision)
        return new

    monkeypatch.setattr(Membership, "install", recording)
    yield installed
    split = {r: views for r, views in installed.items() if len(views) > 1}
    assert not split, f"two views of one revision: {split}"


@pytest.fixture
def mock_clock(one_view_per_revision: dict[int, set[Decision]]) -> trio.testing.MockClock:
    """The clock of every swarm test, which so also checks one view per revision."""
    return trio.testing.MockClock(autojump_threshold=0)


def ids(n: int, first: int = 0) -> list[str]:
    return [f"p{i:02d}" for i in range(first, first + n)]


class WrappedFabric:
    """A member's fabric with the methods a subclass defines replaced (a test's
    fault); everything else goes to the real one."""

    def __init__(self, inner: MemFabric) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def me(self) -> str:
        return self._inner.me


class Swarm:
    def __init__(self, nursery: trio.Nursery, network: MemNetwork, config: EngineConfig) -> None:
        self.nursery = nursery
        self.net = network
        self.config = config
        self.engines: dict[str, Engine] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.fabrics: dict[str, Any] = {}
        self.task_scopes: dict[str, list[trio.CancelScope]] = {}

    def add_fabric(self, peer: str, wrap: Callable[[MemFabric], Any] | None = None) -> None:
        """A fabric for ``peer``, optionally wrapped (e.g. to corrupt what it sends)."""
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
        self.scopes[peer].cancel()
        for scope in self.task_scopes.pop(peer, []):
            scope.cancel()
        del self.engines[peer]

    async def each(
        self, fn: Callable[[str, Engine], Awaitable[Any]], peers: list[str] | None = None
    ) -> dict[str, Any]:
        """Run ``fn`` on every (given) live peer at once; exceptions become values.
        A peer killed meanwhile is left out of the result."""
        out: dict[str, Any] = {}
        killed: set[str] = set()

        async def one(peer: str, engine: Engine) -> None:
            with trio.CancelScope() as scope:
                self.task_scopes.setdefault(peer, []).append(scope)
                try:
                    out[peer] = await fn(peer, engine)
                except PeerdError as exc:
                    out[peer] = exc
            if scope.cancelled_caught:
                killed.add(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers if peers is not None else self.alive():
                nursery.start_soon(one, peer, self.engines[peer])
        return {p: v for p, v in out.items() if p not in killed and p in self.engines}

    def alive(self) -> list[str]:
        return sorted(self.engines)


def uneven_links(s: Swarm, trial: int) -> None:
    """Link latencies of 2-6 ms among the first four peers, varied by
    ``trial``, so that a fault injected 50 ms in lands mid-round at
    different points of it."""
    for i in range(4):
        for j in range(i + 1, 4):
            s.net.set_link(f"p0{i}", f"p0{j}", latency=0.002 * (1 + (i + j + trial) % 3))


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


def inputs(
    peers: list[str], n: int, seed: int = 0, dtype: type = np.float32
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(n).astype(dtype) for p in peers}


def reference(arrays: dict[str, np.ndarray], peers: list[str], average: bool) -> np.ndarray:
    total = sum(arrays[p].astype(np.float64) for p in peers)
    assert isinstance(total, np.ndarray)
    return total / len(peers) if average else total


def same_bytes(values: list[Any]) -> bool:
    blobs = {bytes(np.asarray(v).tobytes()) for v in values}
    return len(blobs) == 1


async def run_while_p00_is_stranded(
    fn: Callable[[str, Engine], Awaitable[Any]],
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Four peers, the link p00-p03 cut during a view change: the others go
    on without p00, which learns it from a vote on its own outvoted proposal
    or, later, from their heartbeat answers. Runs ``fn`` on every peer right
    after the change; returns the others' members and the outcomes, having
    checked that p00's is an ``Evicted`` saying the run went on without it,
    well before a phase deadline."""
    async with swarm(4) as s:
        s.net.cut("p00", "p03")
        await s.each(lambda p, e: e.update_view())
        main = s.engines["p01"].core.view
        assert main is not None and "p00" not in main.members, main
        start = trio.current_time()
        out = await s.each(fn)
        took = trio.current_time() - start
        assert isinstance(out["p00"], Evicted), out
        assert "went on without this peer" in str(out["p00"]), out
        assert took < FAST.phase_timeout / 3, (took, s.engines["p00"].core.view)
        return main.members, out
