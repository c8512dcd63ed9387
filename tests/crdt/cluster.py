"""An in-memory swarm of stores + sync drivers for multi-node tests and the benchmark."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from crdt.driver import SyncDriver
from crdt.memnet import MemoryNetwork
from crdt.store import Store
from crdt.sync import SyncConfig
from peerd.identity import Identity, SwarmKey

SWARM_KEY = SwarmKey(b"swarm-key-for-crdt-tests-32bytes")


@dataclass
class Node:
    identity: Identity
    store: Store
    driver: SyncDriver


def wall_clock() -> float:
    # HLC physical time follows trio's (mock) clock, offset to a realistic epoch.
    return 1_700_000_000.0 + trio.current_time()


@asynccontextmanager
async def open_cluster(
    n: int, *, seed: int = 0, config: SyncConfig | None = None, latency: float = 0.01
) -> AsyncIterator[tuple[MemoryNetwork, list[Node]]]:
    net = MemoryNetwork(latency=latency)
    nodes = []
    for i in range(n):
        identity = Identity.from_seed(b"node-%d" % i)
        store = Store.open(None, identity, SWARM_KEY, wall_clock=wall_clock)
        driver = SyncDriver(
            store, net.endpoint(identity.peer_id), config, random.Random(seed * 1000 + i)
        )
        nodes.append(Node(identity, store, driver))
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.driver.run)
        yield net, nodes
        nursery.cancel_scope.cancel()
    for node in nodes:
        node.store.close()


def converged(stores: Sequence[Store]) -> bool:
    # Equal version vectors are cheap to compare and necessary; equal snapshots decide.
    if len({tuple(sorted(s.log.version_vector().items())) for s in stores}) > 1:
        return False
    return len({s.snapshot() for s in stores}) == 1


async def wait_converged(stores: Sequence[Store]) -> None:
    """Return once every store holds an identical state (woken by store changes)."""
    while not converged(stores):
        async with trio.open_nursery() as nursery:

            async def wait_one(store: Store, version: int) -> None:
                await store.wait_changed(None, version)
                nursery.cancel_scope.cancel()

            for store in stores:
                nursery.start_soon(wait_one, store, store.version())
