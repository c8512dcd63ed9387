"""Many-node simulations on the in-memory network under MockClock.

The default suite runs 300 nodes (and 150 for the sub-key scenarios); the
1000-node run is marked slow (about a minute of CPU on a lightly loaded core;
run with ``-m slow``).
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
from peerd.dht.records import Reject, make_record, owned_subkey, split_subkey
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
    attacker: SimNode, key: bytes, owner: SimNode, subkey: bytes | None
) -> list[bool]:
    """Store every kind of forged record at the k nodes nearest ``key``; which were accepted.

    Sub-key takeovers target the owner's namespace twice: its real sub-key (when
    it has one) and a slot it never used, which no node asked has seen an owner's
    record for, so only the namespace rule stands in the way there."""
    now = trio.current_time()
    thief = sim_identity("sim-attacker")
    genuine = make_record(owner.dht.identity, key, "genuine", ttl=TTL, now=now, subkey=subkey)
    targets = [owner.dht.own_subkey(b"never-used")] + ([subkey] if subkey is not None else [])
    forged = [
        dataclasses.replace(genuine, value=make_record(thief, key, "evil", ttl=TTL, now=now).value),
        dataclasses.replace(genuine, publisher=thief.peer_id.raw),
        make_record(thief, key, "evil" * 2000, ttl=TTL, now=now),
        make_record(thief, key, "evil", ttl=1.0, now=now - 2.0),
    ] + [make_record(thief, key, "evil", ttl=TTL, now=now, subkey=t, seq=2**40) for t in targets]
    closest = (await attacker.dht.lookup(key))[0].closest
    accepted: list[bool] = []
    for record in forged:
        for contact in closest:
            accepted.append(await attacker.dht.store_at(contact, record))
    return accepted


async def run_scenario(n: int, keys: int, seed: int) -> Outcome:
    swarm = Swarm(MemNet(latency=0.02, rng=random.Random(seed)), CONFIG, seed=seed)
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        nodes = await swarm.spawn(nursery, n)
        await swarm.join(nodes, batch=50)
        expected: dict[bytes, dict[bytes | None, object]] = {}
        owners: dict[bytes, SimNode] = {}
        for i in range(keys):
            publisher = rng.choice(nodes[1:])
            # Every fourth key is announced under a sub-key in the publisher's namespace.
            subkey = b"member" if i % 4 == 0 else None
            await publisher.dht.put(key_of(i), {"i": i}, TTL, subkey=subkey)
            full = publisher.dht.own_subkey(subkey) if subkey is not None else None
            expected[key_of(i)] = {full: {"i": i}}
            owners[key_of(i)] = publisher

        attacker = nodes[0]
        accepted: list[bool] = []
        # About six keys, plain and sub-keyed alike.
        for i in range(0, keys, max(1, keys // 6)):
            [(subkey, _)] = expected[key_of(i)].items()
            accepted += await forge_against(attacker, key_of(i), owners[key_of(i)], subkey)

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


async def test_squatting_every_node_first_never_wins_a_subkey(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The attacker reaches every node before the owner publishes: under first-claim
    ownership it would hold the slot everywhere. The namespace rule refuses it at
    each node on its own, so the owner's later, lower-seq record is what all read."""
    swarm = Swarm(MemNet(latency=0.02, rng=random.Random(7)), CONFIG, seed=7)
    key = key_of(10_000)
    async with trio.open_nursery() as nursery:
        nodes = await swarm.spawn(nursery, 150)
        await swarm.join(nodes, batch=50)
        attacker, owner = nodes[0], nodes[1]
        slot = owner.dht.own_subkey(b"member")
        squat = make_record(attacker.dht.identity, key, "stolen", ttl=TTL,
                            now=trio.current_time(), subkey=slot, seq=2**60)
        accepted = [await attacker.dht.store_at(x.dht.me, squat) for x in nodes[1:]]
        assert len(accepted) == len(nodes) - 1 and not any(accepted)
        refused = sum(x.dht.store.rejections().get(Reject.SUBKEY_NOT_OWNED, 0) for x in nodes)
        assert refused == len(nodes) - 1
        # The attacker may announce under the key, in its own namespace only.
        assert await attacker.dht.put(key, "mine", TTL, subkey=slot) >= CONFIG.k

        await owner.dht.put(key, "genuine", TTL, subkey=b"member")
        assert all(r.publisher == owner.dht.peer_id.raw
                   for x in nodes for r in x.dht.store.get(key, trio.current_time())
                   if r.subkey == slot)
        for reader in random.Random(7).sample(nodes, 20):
            got = await reader.dht.get(key)
            assert got == {slot: "genuine", attacker.dht.own_subkey(slot): "mine"}
            assert split_subkey(attacker.dht.own_subkey(slot))[0] == attacker.dht.peer_id
        nursery.cancel_scope.cancel()


async def test_run_membership_announced_under_one_key(autojump_clock: trio.abc.Clock) -> None:
    """Forty members announce themselves under one run key, each in its own
    namespace; every reader gets the whole roster, and a member's re-announcement
    replaces only its own entry."""
    swarm = Swarm(MemNet(latency=0.02, rng=random.Random(8)), CONFIG, seed=8)
    run_key = key_of(20_000)
    async with trio.open_nursery() as nursery:
        nodes = await swarm.spawn(nursery, 150)
        await swarm.join(nodes, batch=50)
        members = random.Random(8).sample(nodes, 40)
        async with trio.open_nursery() as announce:
            for m in members:
                announce.start_soon(m.dht.put, run_key, {"addr": m.address, "step": 0}, TTL,
                                    b"member")
        await members[0].dht.put(run_key, {"addr": members[0].address, "step": 5}, TTL,
                                 subkey=b"member")
        roster = {owned_subkey(m.dht.peer_id.raw, b"member"): {"addr": m.address, "step": 0}
                  for m in members}
        roster[members[0].dht.own_subkey(b"member")]["step"] = 5
        for reader in random.Random(9).sample(nodes, 10):
            got = await reader.dht.get(run_key)
            assert got == roster
            assert {split_subkey(sk)[0] for sk in got if sk is not None} == {
                m.dht.peer_id for m in members
            }
        nursery.cancel_scope.cancel()
