"""Disk-backed replicas: remote deltas are durable once accepted; a restarted node catches up."""

from __future__ import annotations

import random
from pathlib import Path

import trio
from trio.testing import MockClock

from crdt.driver import SyncDriver
from crdt.memnet import MemoryNetwork
from crdt.store import Store
from peerd.identity import Identity

from .cluster import SWARM_KEY, converged, wait_converged, wall_clock

IDS = [Identity.from_seed(b"restart-%d" % i) for i in range(4)]


async def test_restarted_node_keeps_remote_deltas_and_catches_up(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    net = MemoryNetwork()
    endpoints = [net.endpoint(i.peer_id) for i in IDS]
    stores = [Store.open(tmp_path / str(n), IDS[n], SWARM_KEY, wall_clock=wall_clock)
              for n in range(4)]
    async with trio.open_nursery() as nursery:
        scopes = []
        for n in range(4):
            driver = SyncDriver(stores[n], endpoints[n], rng=random.Random(n))
            scope = trio.CancelScope()
            scopes.append(scope)

            async def run(d: SyncDriver = driver, s: trio.CancelScope = scope) -> None:
                with s:
                    await d.run()

            nursery.start_soon(run)
        for n, store in enumerate(stores):
            store.doc("run/abc").set(f"from{n}", n)
            store.counter("steps").increment(n + 1)
        with trio.fail_after(30):
            await wait_converged(stores)

        # Node 3 crashes (no clean shutdown of its sync task); the others keep writing.
        scopes[3].cancel()
        net.set_down(IDS[3].peer_id)
        held_before_crash = stores[3].snapshot()
        stores[3].close()
        for store in stores[:3]:
            store.orset("roster").add(store.peer_id.text)
            store.counter("steps").increment(10)
        with trio.fail_after(30):
            await wait_converged(stores[:3])
        with Store.open(tmp_path / "3", IDS[3], SWARM_KEY) as stale:
            assert not converged([stores[0], stale])  # it missed the writes while down

        # It restarts from its database: everything it had accepted is still there.
        reopened = Store.open(tmp_path / "3", IDS[3], SWARM_KEY, wall_clock=wall_clock)
        assert reopened.snapshot() == held_before_crash
        net.set_down(IDS[3].peer_id, False)
        endpoints[3].handlers.clear()  # the old process's handlers died with it
        stores[3] = reopened
        nursery.start_soon(SyncDriver(reopened, endpoints[3], rng=random.Random(9)).run)
        with trio.fail_after(30):
            await wait_converged(stores)
        assert reopened.counter("steps").value() == 1 + 2 + 3 + 4 + 30
        assert len(reopened.orset("roster").elements()) == 3
        nursery.cancel_scope.cancel()
