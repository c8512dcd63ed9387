"""Many DHT nodes on one ``MemNet``: the harness shared by tests and benchmarks.

Identities come from fixed seeds so a simulation is reproducible; nodes join
through already-joined nodes in concurrent batches, as a growing swarm would.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import trio

from peerd.dht.config import DhtConfig
from peerd.dht.memnet import MemNet, MemRpc
from peerd.dht.node import Dht
from peerd.identity import Identity


@functools.lru_cache(maxsize=16384)
def sim_identity(label: str) -> Identity:
    """A deterministic identity, cached: simulations and tests reuse thousands."""
    return Identity.from_seed(f"peerd-dht-sim-{label}".encode())


@dataclass
class SimNode:
    dht: Dht
    rpc: MemRpc
    scope: trio.CancelScope
    alive: bool = True

    @property
    def address(self) -> str:
        return self.rpc.address


class Swarm:
    """Creates, joins and kills simulated nodes inside the caller's nursery."""

    def __init__(self, net: MemNet, config: DhtConfig, *, seed: int = 0) -> None:
        self.net = net
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.nodes: list[SimNode] = []

    async def spawn(self, nursery: trio.Nursery, count: int) -> list[SimNode]:
        """Start ``count`` nodes (not yet joined); each runs its background tasks."""
        new: list[SimNode] = []
        for _ in range(count):
            i = len(self.nodes)
            identity = sim_identity(f"{self.seed}-{i}")
            rpc = self.net.attach(identity.peer_id, f"mem:{i}")
            dht = Dht(identity, rpc, [rpc.address], config=self.config,
                      wall_clock=trio.current_time, rng=random.Random(self.seed * 1_000_003 + i))
            rpc.serve(dht.handle)
            node = SimNode(dht, rpc, trio.CancelScope())
            await nursery.start(self._run, node)
            self.nodes.append(node)
            new.append(node)
        return new

    @staticmethod
    async def _run(node: SimNode, *, task_status: trio.TaskStatus[None]) -> None:
        with node.scope:
            await node.dht.run(task_status=task_status)

    async def join(self, nodes: list[SimNode], batch: int = 25) -> None:
        """Bootstrap ``nodes`` in concurrent batches via random already-joined nodes."""
        joined = [n for n in self.nodes if n.alive and n not in nodes] or nodes[:1]
        pending = [n for n in nodes if n is not joined[0]]
        for start in range(0, len(pending), batch):
            group = pending[start : start + batch]
            async with trio.open_nursery() as nursery:
                for node in group:
                    via = self.rng.choice(joined)
                    nursery.start_soon(node.dht.bootstrap, [via.address])
            joined.extend(group)

    def kill(self, node: SimNode) -> None:
        node.alive = False
        self.net.kill(node.address)
        node.scope.cancel()

    def alive(self) -> list[SimNode]:
        return [n for n in self.nodes if n.alive]
