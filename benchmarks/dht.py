"""DHT lookup cost in simulated swarms of 1000 and 5000 nodes.

Nodes join through random earlier nodes on the in-memory network (MockClock,
fixed 20 ms one-way latency, no jitter, so elapsed time / RTT counts sequential
round trips exactly). 50 keys are put, then 200 gets from random nodes. For each
size it prints median and p99 rounds (sequential round trips of a get) and hops
(longest chain of referrals the lookup followed), messages per lookup, and
resident memory per node. It then has random nodes squat 20 sub-keys in other
nodes' namespaces at the k nearest nodes before the owners publish, and counts
how many of those forged stores were accepted and how often a reader still gets
the owner's value. The last line is median rounds at 5000 nodes divided by
log2(5000).

Run: python benchmarks/dht.py [sizes...]
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import statistics
import sys
import time

import trio
import trio.testing

from peerd.dht.config import DhtConfig
from peerd.dht.memnet import MemNet
from peerd.dht.records import make_record
from peerd.dht.sim import SimNode, Swarm

LATENCY = 0.02
KEYS = 50
GETS = 200
SQUATS = 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def measure(n: int) -> float:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    net = MemNet(latency=LATENCY, jitter=0.0, rng=random.Random(n))
    swarm = Swarm(net, DhtConfig(node_record_ttl=None, join_refresh=False), seed=n)
    rng = random.Random(n)
    async with trio.open_nursery() as nursery:
        nodes = await swarm.spawn(nursery, n)
        await swarm.join(nodes, batch=50)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu1 = time.process_time()
        keys = [hashlib.sha256(b"bench-%d" % i).digest() for i in range(KEYS)]
        for i, key in enumerate(keys):
            await rng.choice(nodes).dht.put(key, i, 3600.0)
        rounds: list[float] = []
        hops: list[float] = []
        messages: list[float] = []
        found = 0
        for j in range(GETS):
            i = j % KEYS
            start = trio.current_time()
            got = await rng.choice(nodes).dht.publisher.get_detailed(keys[i])
            rounds.append(round((trio.current_time() - start) / (2 * LATENCY), 6))
            hops.append(got.lookup.hops)
            messages.append(got.lookup.messages)
            found += got.values == {None: i}
        tables = [len(x.dht.table) for x in nodes]
        squat_accepted, squat_tries, owner_read = await squat(nodes, rng)
        nursery.cancel_scope.cancel()
    print(f"n={n}: join cpu {cpu1 - cpu0:.1f}s, routing table mean {statistics.mean(tables):.0f}"
          f" contacts, gets found {found}/{GETS}")
    print(f"n={n}: rounds median {statistics.median(rounds):.1f} p99 {pct(rounds, 0.99):.1f}; "
          f"hops median {statistics.median(hops):.1f} p99 {pct(hops, 0.99):.1f}; "
          f"messages/lookup mean {statistics.mean(messages):.1f} p99 {pct(messages, 0.99):.0f}")
    # ru_maxrss is in KiB on Linux; the swarm's growth over its size approximates per node
    # (routing table, store, trio tasks, identity).
    print(f"n={n}: sub-key squats before the owner published: {squat_accepted}/{squat_tries} "
          f"forged stores accepted, owner's value read {owner_read}/{SQUATS}")
    print(f"n={n}: memory per node ~{(rss1 - rss0) * 1024 / n / 1024:.1f} KiB (RSS growth / n)")
    return statistics.median(rounds)


async def squat(nodes: list[SimNode], rng: random.Random) -> tuple[int, int, int]:
    """Forged claims on other nodes' sub-keys, stored first; (accepted, tried, owner read)."""
    accepted = tried = owner_read = 0
    for i in range(SQUATS):
        key = hashlib.sha256(b"bench-squat-%d" % i).digest()
        owner, attacker, reader = rng.sample(nodes, 3)
        slot = owner.dht.own_subkey(b"member")
        forged = make_record(attacker.dht.identity, key, "stolen", ttl=3600.0,
                             now=trio.current_time(), subkey=slot, seq=2**60)
        for contact in (await attacker.dht.lookup(key))[0].closest:
            tried += 1
            accepted += await attacker.dht.store_at(contact, forged)
        await owner.dht.put(key, "genuine", 3600.0, subkey=b"member")
        owner_read += (await reader.dht.get(key)).get(slot) == "genuine"
    return accepted, tried, owner_read


async def main(sizes: list[int]) -> None:
    medians = {n: await measure(n) for n in sizes}
    last = max(sizes)
    print(f"median rounds at {last} nodes / log2({last}) = "
          f"{medians[last] / math.log2(last):.3f}")


if __name__ == "__main__":
    chosen = [int(a) for a in sys.argv[1:]] or [1000, 5000]
    trio.run(main, chosen, clock=trio.testing.MockClock(autojump_threshold=0))
