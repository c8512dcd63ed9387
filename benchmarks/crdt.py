"""CRDT store convergence: delta anti-entropy vs shipping full states.

For each swarm size, ``--writes`` writes (see ``one_write``: per-step metrics,
overwritten throughput and config fields, a step counter, roster joins/leaves)
are spread over 10 mock seconds across random nodes of an in-memory network
(10 ms latency) driven by trio's MockClock; gossip runs as configured in
``SyncConfig`` (1 s interval, 1 peer per round, local writes pushed to 2
peers). We report the mock time from the last write until every replica holds
identical state, the gossip rounds per node in that time, and the bytes every
node sent (requests, replies and pushes; every delta is signed and
swarm-proven).

The full-state figure charges each anti-entropy exchange that actually ran
(until convergence) with the full-state encoding of both sides at that moment
(what a state-based CRDT exchanging whole states on the same schedule would
send). Pushes are not charged to it, so the comparison favours full state.

The last line is ``ratio delta-bytes/full-state-bytes (N nodes): X.XXX`` for
the largest swarm. Usage: ``python benchmarks/crdt.py [--nodes 10 50] [--writes 10000]``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

# This script is named like the package it measures: keep its directory off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import trio  # noqa: E402
import trio.testing  # noqa: E402

from crdt.driver import SyncDriver  # noqa: E402
from crdt.memnet import MemoryEndpoint, MemoryNetwork  # noqa: E402
from crdt.store import Store  # noqa: E402
from crdt.sync import METHOD_SYNC, SyncConfig  # noqa: E402
from peerd.identity import Identity, PeerId, SwarmKey  # noqa: E402
from peerd.wire import decode_untrusted  # noqa: E402

SWARM_KEY = SwarmKey(b"benchmark-swarm-key-32-bytes-xx!")
WRITE_SECONDS = 10.0
POLL = 0.05  # convergence check resolution, mock seconds


class FullStateMeter:
    """Charges each sync exchange with both sides' full-state sizes (until stopped)."""

    def __init__(self) -> None:
        self.stores: dict[PeerId, Store] = {}
        self.bytes = 0
        self.exchanges = 0
        self.running = True


class MeteredEndpoint(MemoryEndpoint):
    meter: FullStateMeter
    continuing: set[PeerId]

    async def call(self, peer: PeerId, method: str, payload: bytes = b"") -> bytes:
        answer = await super().call(peer, method, payload)
        if method != METHOD_SYNC:
            return answer
        # A follow-up chunk continues the same exchange: charge full state once.
        if self.meter.running and peer not in self.continuing:
            self.meter.exchanges += 1
            self.meter.bytes += self.meter.stores[self.peer].full_state_bytes()
            self.meter.bytes += self.meter.stores[peer].full_state_bytes()
        if decode_untrusted(answer).more:
            self.continuing.add(peer)
        else:
            self.continuing.discard(peer)
        return answer


@dataclass(frozen=True)
class Result:
    nodes: int
    writes: int
    converge_s: float
    rounds: float
    delta_bytes: int
    full_bytes: int
    exchanges: int
    state_bytes: int
    log_bytes: int
    duplicates: int
    accepted: int
    wall_s: float


def one_write(store: Store, rng: random.Random, i: int) -> None:
    """The run-state mix: metrics appended per step, measured throughput and config
    overwritten in place, step counter, roster joins/leaves."""
    kind = rng.random()
    me = store.peer_id.short
    if kind < 0.4:
        store.doc(f"metrics/{me}").set(f"step/{i}", {"loss": rng.random(), "tok_s": 9000})
    elif kind < 0.6:
        store.doc("throughput").set(me, rng.randrange(10**9))
    elif kind < 0.8:
        store.counter("steps").increment(rng.randrange(1, 10))
    elif kind < 0.9:
        store.doc("run/abc").set(f"cfg{rng.randrange(50)}", rng.randrange(10**6))
    elif kind < 0.97:
        store.orset("roster").add(f"peer-{rng.randrange(100)}")
    else:
        store.orset("roster").remove(f"peer-{rng.randrange(100)}")


def converged(stores: list[Store]) -> bool:
    if len({tuple(sorted(s.log.version_vector().items())) for s in stores}) > 1:
        return False
    return len({s.snapshot() for s in stores}) == 1


async def run_swarm(n: int, writes: int, seed: int) -> Result:
    rng = random.Random(seed)
    net = MemoryNetwork(latency=0.01)
    meter = FullStateMeter()
    stores: list[Store] = []
    drivers: list[SyncDriver] = []
    for i in range(n):
        ident = Identity.from_seed(b"bench-%d" % i)
        store = Store.open(
            None, ident, SWARM_KEY, wall_clock=lambda: 1_700_000_000 + trio.current_time()
        )
        endpoint = MeteredEndpoint(net, ident.peer_id)
        endpoint.meter = meter
        endpoint.continuing = set()
        net._endpoints[ident.peer_id] = endpoint  # a metered endpoint in place of endpoint()
        meter.stores[ident.peer_id] = store
        stores.append(store)
        drivers.append(SyncDriver(store, endpoint, SyncConfig(), random.Random(seed + i)))
    wall = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for d in drivers:
            nursery.start_soon(d.run)
        bursts = 100
        for b in range(bursts):
            for i in range(b * writes // bursts, (b + 1) * writes // bursts):
                one_write(rng.choice(stores), rng, i)
            await trio.sleep(WRITE_SECONDS / bursts)
        last_write = trio.current_time()
        rounds_before = sum(d.statistics().rounds for d in drivers)
        while not converged(stores):
            await trio.sleep(POLL)
        meter.running = False
        took = trio.current_time() - last_write
        rounds = (sum(d.statistics().rounds for d in drivers) - rounds_before) / n
        sent = sum(d.statistics().bytes_sent for d in drivers)
        duplicates = sum(s.statistics().duplicates for s in stores)
        accepted = sum(s.statistics().accepted for s in stores)
        nursery.cancel_scope.cancel()
    return Result(
        n, writes, took, rounds, sent, meter.bytes, meter.exchanges,
        stores[0].full_state_bytes(), stores[0].log.total_bytes, duplicates, accepted,
        time.perf_counter() - wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--writes", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results = []
    for n in args.nodes:
        r = trio.run(run_swarm, n, args.writes, args.seed,
                     clock=trio.testing.MockClock(autojump_threshold=0))
        results.append(r)
        print(
            f"{r.nodes} nodes, {r.writes} writes over {WRITE_SECONDS:.0f} mock-s: converged "
            f"{r.converge_s:.2f} mock-s after the last write ({r.rounds:.1f} gossip rounds/node); "
            f"delta sync sent {r.delta_bytes / 1e6:.2f} MB; full-state exchange would send "
            f"{r.full_bytes / 1e6:.2f} MB over the same {r.exchanges} exchanges; "
            f"state {r.state_bytes / 1e3:.0f} kB/replica, signed log {r.log_bytes / 1e6:.2f} "
            f"MB/replica; {r.duplicates} redundant deltas received vs {r.accepted} accepted; "
            f"ratio {r.delta_bytes / r.full_bytes:.3f} [{r.wall_s:.0f} s wall]",
            flush=True,
        )
    last = results[-1]
    print(f"ratio delta-bytes/full-state-bytes ({last.nodes} nodes): "
          f"{last.delta_bytes / last.full_bytes:.3f}")


if __name__ == "__main__":
    main()
