"""The trio driver on a small in-memory network (MockClock)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import trio

from peerd.dht.config import DhtConfig
from peerd.dht.memnet import MemNet
from peerd.dht.messages import (
    METHOD_FIND_VALUE,
    METHOD_STORE,
    FindValueResponse,
    StoreRequest,
    decode_response,
)
from peerd.dht.node import Dht
from peerd.dht.records import Record, make_record, split_subkey
from peerd.dht.sim import Swarm, sim_identity
from peerd.dht.transport import PeerRef
from peerd.wire import decode_untrusted, encode

KEY = hashlib.sha256(b"run/test").digest()
CONFIG = DhtConfig(node_record_ttl=None, join_refresh=False)


async def small_swarm(nursery: trio.Nursery, n: int = 20, config: DhtConfig = CONFIG,
                      seed: int = 5) -> Swarm:
    swarm = Swarm(MemNet(latency=0.02), config, seed=seed)
    nodes = await swarm.spawn(nursery, n)
    await swarm.join(nodes, batch=10)
    return swarm


async def test_put_then_get_from_every_node(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery, config=dataclasses.replace(CONFIG, join_refresh=True))
        stored = await swarm.nodes[3].dht.put(KEY, {"lr": 0.1}, ttl=600.0)
        assert stored >= CONFIG.k
        for node in swarm.nodes:
            assert await node.dht.get(KEY) == {None: {"lr": 0.1}}
        assert await swarm.nodes[0].dht.get(hashlib.sha256(b"absent").digest()) == {}
        nursery.cancel_scope.cancel()


async def test_many_publishers_share_a_key_by_subkey(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery)
        members = swarm.nodes[:8]
        for m in members:
            await m.dht.put(KEY, {"rank": m.address}, ttl=600.0, subkey=b"member")
        expected = {m.dht.own_subkey(b"member"): {"rank": m.address} for m in members}
        got = await swarm.nodes[15].dht.get(KEY)
        assert got == expected
        assert {split_subkey(sk) for sk in got if sk is not None} == {
            (m.dht.peer_id, b"member") for m in members
        }
        # Naming someone else's full sub-key only writes inside one's own namespace.
        thief = swarm.nodes[9].dht
        victim = members[0].dht.own_subkey(b"member")
        assert await thief.put(KEY, {"rank": "stolen"}, ttl=600.0, subkey=victim) >= 1
        got = await swarm.nodes[19].dht.get(KEY)
        assert got[victim] == {"rank": members[0].address}
        assert got[thief.own_subkey(victim)] == {"rank": "stolen"}
        assert split_subkey(thief.own_subkey(victim))[0] == thief.peer_id
        # Passing the already-prefixed sub-key back addresses the same slot.
        await members[1].dht.put(KEY, "v2", ttl=600.0,
                                 subkey=members[1].dht.own_subkey(b"member"))
        assert (await swarm.nodes[18].dht.get(KEY))[members[1].dht.own_subkey(b"member")] == "v2"
        nursery.cancel_scope.cancel()


async def test_unpublish_takes_the_subkey_as_put_got_it(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery)
        member, reader = swarm.nodes[2].dht, swarm.nodes[11].dht
        await member.put(KEY, "here", ttl=300.0, subkey=b"member")
        assert len(member.publisher) == 1
        member.unpublish(KEY, subkey=b"member")
        assert len(member.publisher) == 0
        await trio.sleep(400.0)  # past the TTL with no republish
        assert await reader.get(KEY) == {}
        nursery.cancel_scope.cancel()


async def test_records_are_republished_until_unpublished(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery)
        publisher, reader = swarm.nodes[1].dht, swarm.nodes[17].dht
        await publisher.put(KEY, "alive", ttl=300.0)
        await trio.sleep(1000.0)  # three TTLs: only republishing keeps it
        assert await reader.get(KEY) == {None: "alive"}
        publisher.unpublish(KEY)
        await trio.sleep(400.0)
        assert await reader.get(KEY) == {}
        assert all(len(n.dht.store) == 0 for n in swarm.nodes)
        nursery.cancel_scope.cancel()


async def test_find_peer_uses_signed_node_record(autojump_clock: trio.abc.Clock) -> None:
    config = dataclasses.replace(CONFIG, node_record_ttl=600.0)
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery, config=config)
        seeker, target = swarm.nodes[0].dht, swarm.nodes[12]
        seeker.table.remove(target.dht.peer_id, trio.current_time())
        assert await seeker.find_peer(target.dht.peer_id) == (target.address,)
        swarm.kill(target)  # the signed record outlives the node's reachability
        seeker.table.remove(target.dht.peer_id, trio.current_time())
        assert await seeker.find_peer(target.dht.peer_id) == (target.address,)
        assert await seeker.find_peer(sim_identity("nobody").peer_id) is None
        assert await seeker.find_peer(seeker.peer_id) == seeker.addresses
        nursery.cancel_scope.cancel()


async def test_store_rpc_refuses_forgeries(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery, n=10)
        victim, attacker = swarm.nodes[0].dht, sim_identity("attacker")
        slot = victim.own_subkey(b"slot")
        good = make_record(victim.identity, KEY, "real", ttl=600.0, now=trio.current_time(),
                           subkey=slot, seq=1)
        target, fresh = swarm.nodes[1].dht, swarm.nodes[2].dht
        sender = PeerRef(attacker.peer_id.text, "mem:attacker")

        async def store(node: Dht, record: Record) -> tuple[bool, str]:
            reply = decode_response(METHOD_STORE, await node.handle(
                sender, METHOD_STORE, encode(StoreRequest(record, ()))))
            return reply.accepted, reply.reason

        assert await store(target, good) == (True, "")
        now = trio.current_time()
        takeover = make_record(attacker, KEY, "mine now", ttl=600.0, now=now, subkey=slot,
                               seq=9)
        forged = [
            dataclasses.replace(good, value=make_record(victim.identity, KEY, "x", ttl=600.0,
                                                        now=now).value),
            dataclasses.replace(good, publisher=attacker.peer_id.raw),
            make_record(attacker, KEY, "y" * 5000, ttl=600.0, now=now),
            make_record(attacker, KEY, "late", ttl=1.0, now=now - 5.0),
            takeover,
        ]
        for f in forged:
            accepted, reason = await store(target, f)
            assert not accepted and reason
        assert target.store.get(KEY, trio.current_time()) == [good]
        # A node that never saw the victim's record refuses the takeover just the same.
        assert await store(fresh, takeover) == (False, "subkey_not_owned")
        assert fresh.store.get(KEY, trio.current_time()) == []
        nursery.cancel_scope.cancel()


async def test_forged_values_from_a_lying_holder_are_dropped(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        # A quorum above the swarm size makes every get ask every holder, the liar too.
        config = dataclasses.replace(CONFIG, value_quorum=50)
        swarm = await small_swarm(nursery, n=12, config=config)
        owner = swarm.nodes[2].dht
        await owner.put(KEY, "true", ttl=600.0)
        await owner.put(KEY, "mine", ttl=600.0, subkey=b"member")
        liar = swarm.nodes[5]
        honest_handle = liar.dht.handle
        forger = sim_identity("forger")

        async def lying_handle(sender: PeerRef, method: str, payload: bytes) -> bytes:
            answer = await honest_handle(sender, method, payload)
            if method != METHOD_FIND_VALUE:
                return answer
            resp = decode_untrusted(answer, expect=FindValueResponse)
            bad = make_record(forger, KEY, "lie", ttl=600.0, now=trio.current_time())
            tampered = dataclasses.replace(resp.records[0], value=bad.value)
            squat = make_record(forger, KEY, "lie", ttl=600.0, now=trio.current_time(),
                                subkey=owner.own_subkey(b"member"), seq=2**40)
            return encode(dataclasses.replace(resp, records=(tampered, bad, squat)))

        liar.rpc.serve(lying_handle)
        reader = swarm.nodes[8].dht
        for _ in range(3):
            dropped = reader.statistics().forged_records_dropped
            values = await reader.get(KEY)
            assert values == {None: "true", owner.own_subkey(b"member"): "mine"}
            # The tampered record and the squatting claim, at least, on every get.
            assert reader.statistics().forged_records_dropped >= dropped + 2
        nursery.cancel_scope.cancel()


async def test_routing_table_persists_across_restart(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery, n=20)
        await swarm.nodes[4].dht.put(KEY, 7, ttl=600.0)
        net = swarm.net
        ident = sim_identity("restarter")
        rpc = net.attach(ident.peer_id, "mem:restarter")
        first = Dht(ident, rpc, [rpc.address], config=CONFIG, wall_clock=trio.current_time,
                    data_dir=tmp_path)
        rpc.serve(first.handle)
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: first.run())
            assert await first.bootstrap([swarm.nodes[0].address]) > 0
            saved = {c.peer_id for c in first.table.contacts()}
            scope.cancel()
        first.save_routing_table()
        assert (tmp_path / CONFIG.routing_file).exists()

        second = Dht(ident, rpc, [rpc.address], config=CONFIG, wall_clock=trio.current_time,
                     data_dir=tmp_path)
        rpc.serve(second.handle)
        assert second.load_routing_table() == len(saved)
        assert {c.peer_id for c in second.table.contacts()} == saved
        assert await second.bootstrap([]) > 0  # no addresses: the saved contacts suffice
        assert await second.get(KEY) == {None: 7}
        (tmp_path / CONFIG.routing_file).write_bytes(b"\x00garbage")
        third = Dht(ident, rpc, [rpc.address], config=CONFIG, data_dir=tmp_path)
        assert third.load_routing_table() == 0
        nursery.cancel_scope.cancel()


async def test_dead_contacts_leave_the_table(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        swarm = await small_swarm(nursery, n=30)
        observer = swarm.nodes[0].dht
        dead = [n for n in swarm.nodes[1:] if observer.table.get(n.dht.peer_id)][:5]
        for n in dead:
            swarm.kill(n)
        for i in range(10):
            await observer.find_node(hashlib.sha256(b"probe-%d" % i).digest())
        for n in dead:
            assert observer.table.get(n.dht.peer_id) is None
        stats = observer.statistics()
        assert stats.rpc_failures > 0 and stats.lookups >= 10
        nursery.cancel_scope.cancel()
