"""A node's runs: joining and leaving them, and the collectives on their engines.

Mixed into ``peerd.node.Node``; the daemon forwards its clients' calls to these.
Each run's engine (``collectives.run``) lives in a task of the node's nursery
until the node leaves the run or closes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import trio

from collectives.api import AllReduceResult, Quant, ReduceOp, SyncResult, SyncStrategy, View
from collectives.driver import EngineStopped
from collectives.p2p import PointToPoint, Scattered
from collectives.run import Engine, EngineConfig, open_engine
from collectives.statesync import StateSync
from peerd.config import NodeConfig
from peerd.errors import ConfigError
from peerd.fabric import NodeFabric
from peerd.identity import PeerId


class RunsMixin:
    """Runs and collectives of a node (see ``peerd.node.Node``)."""

    _nursery: trio.Nursery
    fabric: NodeFabric
    _runs: dict[str, tuple[Engine, trio.CancelScope]]
    config: NodeConfig

    async def join_run(self, run: str, members: tuple[str, ...] | list[str] | None = None,
                       config: EngineConfig | None = None,
                       timeout: float | None = None) -> Engine:
        """Take part in ``run``. With ``members`` (peer ids, this node among
        them) every listed peer starts at revision 0 at once; without, this
        node asks the connected members of the run to admit it at their next
        round boundary and returns once a view includes it."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        while run in self._runs:
            running = self._runs[run][0]
            if members is not None or running.current_view() is not None:
                return running
            # Another join of the run is under way here, or it was evicted. If
            # that join gives up, its engine stops and this one starts afresh.
            try:
                await running.join(None if timeout is None else deadline - trio.current_time())
                return running
            except EngineStopped:
                if trio.current_time() >= deadline:
                    raise
                if timeout is not None:
                    timeout = max(0.0, deadline - trio.current_time())
        # One knob for the node's data path: the ring's numpy work goes to
        # worker threads when its data channels' I/O does.
        config = config or EngineConfig()
        if config.worker_threads is None:
            config = replace(config, worker_threads=self.config.data_threads)

        async def host(task_status: trio.TaskStatus[Engine]) -> None:
            with trio.CancelScope() as scope:
                async with open_engine(self.fabric, run, members=members,
                                       config=config) as engine:
                    self._runs[run] = (engine, scope)
                    task_status.started(engine)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._runs.pop(run, None)

        engine: Engine = await self._nursery.start(host)
        if members is None:
            try:
                await engine.join(timeout)
            except BaseException:
                # Never admitted: the run is not this node's. Kept, it would
                # pass for joined to the next join_run and answer every
                # collective with "join the run first".
                if engine.current_view() is None:
                    self._runs[run][1].cancel()
                raise
        return engine

    async def leave_run(self, run: str) -> None:
        entry = self._runs.get(run)
        if entry is None:
            return
        engine, scope = entry
        with trio.move_on_after(5):
            await engine.leave()
        scope.cancel()

    def _data_link_broken(self, peer: str) -> None:
        """A data link to ``peer`` broke from its side: every run checks at once
        whether the peer is still there (see ``MembershipDriver.link_broken``)."""
        for engine, _ in list(self._runs.values()):
            engine.link_broken(peer)

    def engine(self, run: str) -> Engine:
        entry = self._runs.get(run)
        if entry is None:
            raise ConfigError(f"this node has not joined run {run!r}: join it first "
                              "(client.join(), or node.join_run())")
        return entry[0]

    def runs(self) -> list[str]:
        return sorted(self._runs)

    def view(self, run: str) -> View:
        return self.engine(run).view()

    async def update_view(self, run: str) -> View:
        """A round boundary: agree the next view with the run's members, the
        joiners waiting admitted (every member calls it at the same point of
        its loop, as with a collective; ``sync_state`` is one too)."""
        return await self.engine(run).update_view()

    async def all_reduce(self, run: str, array: object, op: ReduceOp | str = ReduceOp.AVG, *,
                         tag: str = "default", quant: Quant = Quant.NONE,
                         retry: bool = True, out: object = None) -> AllReduceResult:
        """Reduce ``array`` across the run's view, in place or into ``out``; see
        ``Engine.all_reduce``."""
        return await self.engine(run).all_reduce(array, op, tag=tag, quant=quant, retry=retry,
                                                 out=out)

    # Shared state and custom collectives (collectives.statesync, collectives.p2p);
    # the daemon forwards its client's calls to these.

    async def sync_state(self, run: str, state: Mapping[str, Any], revision: int,
                         strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR) -> SyncResult:
        """Make ``state`` bit-identical to the run's popular state, in place; a
        round boundary (joiners are admitted first). See ``StateSync.sync``."""
        return await StateSync.of(self.engine(run)).sync(state, revision, strategy)

    async def all_gather(self, run: str, array: Any, *, tag: str = "gather",
                         retry: bool = True) -> tuple[list[Any], tuple[str, ...]]:
        """Every member's ``array`` (shapes may differ) in view order, and who sent them."""
        return await PointToPoint.of(self.engine(run)).all_gather(array, tag=tag, retry=retry)

    async def send(self, run: str, peer: PeerId | str, array: Any, *, tag: str = "p2p",
                   timeout: float | None = None) -> None:
        """Send ``array`` to member ``peer`` (its ``recv(run, us, tag=tag)`` gets it)."""
        await PointToPoint.of(self.engine(run)).send(_text(peer), array, tag=tag,
                                                      timeout=timeout)

    async def recv(self, run: str, peer: PeerId | str, *, tag: str = "p2p",
                   timeout: float | None = None) -> Any:
        """The next array member ``peer`` sends with ``tag``; ``PeerLost`` if it is lost."""
        return await PointToPoint.of(self.engine(run)).recv(_text(peer), tag=tag,
                                                             timeout=timeout)

    async def broadcast(self, run: str, array: Any, root: PeerId | str, *,
                        tag: str = "broadcast") -> tuple[str, ...]:
        """Overwrite ``array`` with ``root``'s on every member; returns the members."""
        return await PointToPoint.of(self.engine(run)).broadcast(array, _text(root), tag=tag)

    async def reduce_scatter(self, run: str, array: Any, op: ReduceOp | str = ReduceOp.AVG, *,
                             tag: str = "reduce_scatter", retry: bool = True) -> Scattered:
        """This member's reduced chunk of the flattened ``array``; see ``PointToPoint``."""
        return await PointToPoint.of(self.engine(run)).reduce_scatter(array, op, tag=tag,
                                                                      retry=retry)


def _text(peer: PeerId | str) -> str:
    return peer.text if isinstance(peer, PeerId) else str(peer)
