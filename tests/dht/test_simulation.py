"""Many-node simulations on the in-memory network under MockClock.

The default suite runs 300 nodes; the 1000-node run is marked slow (about a
minute of CPU on a lightly loaded core; run with ``-m slow``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass

import pytest
import trio

from peerd.dht.config import DhtConfig
from peerd.dht.memnet import MemNet
from peerd.dht.records import make_record
from peerd.dht.sim import SimNode, Swarm, sim_identity

TTL = 3600.0
CONFIG = DhtConfig(node_record_ttl=None, join_refresh=False)


@dataclass(frozen=True)
class Outcome:
    lookups: int
    found_before: int
    found_after: int
    forged_attempts: int
    forged_accepted: int
    forged_seen: int


def key_of(i: int) -> bytes:
    return hashlib.sha256(b"sim-key-%d" % i).digest()


async def forge_against(
    attacker: SimNode, key: bytes, owner: SimNode, subkey: bytes, nodes: dict[str, SimNode]
) -> list[bool]:
    """Store every kind of forged record at the k nodes nearest ``key``; which were accepted.

    The sub-key takeover is only tried where the owner's record is held: a node that
    never saw the slot has nothing to overwrite (first claim wins there, and replica
    merging ignores a minority claimant)."""
    now = trio.current_time()
    thief = sim_identity("sim-attacker")
    genuine = make_record(owner.dht.identity, key, "genuine", ttl=TTL, now=now, subkey=subkey)
    forged = [
        dataclasses.replace(genuine, value=make_record(thief, key, "evil", ttl=TTL, now=now).value),
        dataclasses.replace(genuine, publisher=thief.peer_id.raw),
        make_record(thief, key, "evil" * 2000, ttl=TTL, now=now),
        make_record(thief, key, "evil", ttl=1.0, now=now - 2.0),
        make_record(thief, key, "evil", ttl=TTL, now=now, subkey=subkey, seq=2**40),
    ]
    closest = (await attacker.dht.lookup(key))[0].closest
    takeover = forged[-1]
    accepted: list[bool] = []
    for record in forged:
        for contact in closest:
            holder = nodes[contact.addresses[0]].dht
            owned = any(r.subkey == subkey for r in holder.store.get(key, now))
            if record is takeover and not owned:
                continue
            accepted.append(await attacker.dht.store_at(contact, record))
    return accepted


async def run_scenario(n: int, keys: int, seed: int) -> Outcome:
    swarm = Swarm(MemNet(latency=0.02, rng=random.Random(seed)), CONFIG, seed=seed)
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        nodes = await swarm.spawn(nursery, n)
        await swarm.join(nodes, batch=50)
        expected: dict[bytes, dict[bytes | None, object]] = {}
        for i in range(keys):
            publisher = rng.choice(nodes)
            # Every fourth key is announced under the publisher's sub-key.
            subkey = publisher.dht.peer_id.raw if i % 4 == 0 else None
            await publisher.dht.put(key_of(i), {"i": i}, TTL, subkey=subkey)
            expected[key_of(i)] = {subkey: {"i": i}}

        attacker = nodes[0]
        accepted: list[bool] = []
        for i in range(0, keys, max(1, keys // 5)):
            [(subkey, _)] = expected[key_of(i)].items()
            owner = next(x for x in nodes if subkey in (None, x.dht.peer_id.raw))
            by_address = {x.address: x for x in nodes}
            accepted += await forge_against(attacker, key_of(i), owner, subkey or b"s", by_address)

        async def count_found(pool: list[SimNode]) -> int:
            found = 0
            for key, want in expected.items():
                found += await rng.choice(pool).dht.get(key) == want
            return found

        found_before = await count_found(nodes)
        for victim in rng.sample(nodes[1:], int(0.3 * n)):
            swarm.kill(victim)
        await trio.sleep(TTL * CONFIG.republish_fraction + CONFIG.maintenance_interval)
        found_after = await count_found(swarm.alive())
        forged_seen = sum(x.dht.statistics().forged_records_dropped for x in swarm.alive())
        nursery.cancel_scope.cancel()
    return Outcome(keys, found_before, found_after, len(accepted), sum(accepted), forged_seen)


def check(outcome: Outcome) -> None:
    assert outcome.found_before == outcome.lookups  # 100% before churn
    assert outcome.found_after >= 0.99 * outcome.lookups
    assert outcome.forged_attempts > 0 and outcome.forged_accepted == 0


async def test_300_nodes_survive_30_percent_loss(autojump_clock: trio.abc.Clock) -> None:
    check(await run_scenario(300, keys=60, seed=1))


@pytest.mark.slow
async def test_1000_nodes_survive_30_percent_loss(autojump_clock: trio.abc.Clock) -> None:
    outcome = await run_scenario(1000, keys=200, seed=2)
    print(outcome)
    check(outcome)
