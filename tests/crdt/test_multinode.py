"""Ten replicas over the in-memory network on a mock clock: partitions, healing, forgeries."""

from __future__ import annotations

import dataclasses
import random

import trio
from trio.testing import MockClock

from crdt.delta import Op, digest_of, membership_proof, seal
from crdt.hlc import Timestamp
from crdt.lww import LwwMap
from crdt.messages import CRDT_PROTOCOL_VERSION, DeltaPush, DocKind, SyncReply
from crdt.sync import METHOD_PUSH, METHOD_SYNC
from peerd.identity import Identity, PeerId, SwarmKey
from peerd.wire import decode_untrusted, encode

from .cluster import SWARM_KEY, Node, converged, open_cluster, wait_converged

# Gossip runs every ~1 s with one random peer; epidemic spread over 10 nodes
# needs a handful of rounds. This bound is generous but finite.
CONVERGENCE_BOUND = 30.0


async def writer(node: Node, rng: random.Random, until: float, totals: dict[str, int]) -> None:
    """Write a mix of operations every ~300 ms of mock time until ``until``."""
    me = node.identity.peer_id.short
    while trio.current_time() < until:
        await trio.sleep(rng.uniform(0.1, 0.5))
        store = node.store
        store.doc("run/abc").set(f"k{rng.randrange(8)}", [me, rng.randrange(1000)])
        amount = rng.randrange(1, 5)
        store.counter("steps").increment(amount)
        totals["steps"] += amount
        if rng.random() < 0.3:
            store.orset("roster").add(me)
        elif rng.random() < 0.2:
            store.orset("roster").remove(me)
        if rng.random() < 0.5:
            store.doc(f"metrics/{me}").set(f"t{rng.randrange(50)}", rng.random())


async def test_ten_nodes_partition_6_4_then_heal_converge(autojump_clock: MockClock) -> None:
    rng = random.Random(7)
    totals = {"steps": 0}
    async with open_cluster(10, seed=1) as (net, nodes):
        stores = [n.store for n in nodes]
        side_a, side_b = nodes[:6], nodes[6:]

        async with trio.open_nursery() as writers:
            for node in nodes:
                writers.start_soon(writer, node, random.Random(rng.random()), 3.0, totals)
        with trio.fail_after(CONVERGENCE_BOUND):
            await wait_converged(stores)
        before = totals["steps"]
        assert before > 0 and stores[0].counter("steps").value() == before

        net.partition([n.identity.peer_id for n in side_a], [n.identity.peer_id for n in side_b])
        start = trio.current_time()
        until = start + 10.0
        async with trio.open_nursery() as writers:
            for node in nodes:
                writers.start_soon(writer, node, random.Random(rng.random()), until, totals)
        with trio.fail_after(CONVERGENCE_BOUND):
            await wait_converged([n.store for n in side_a])
            await wait_converged([n.store for n in side_b])
        # Each side converged on its own, and neither saw the other's partition writes.
        assert not converged(stores)
        a_steps = side_a[0].store.counter("steps").value()
        b_steps = side_b[0].store.counter("steps").value()
        assert before < a_steps < totals["steps"] and before < b_steps < totals["steps"]
        assert (a_steps - before) + (b_steps - before) == totals["steps"] - before

        net.heal()
        healed_at = trio.current_time()
        with trio.fail_after(CONVERGENCE_BOUND):
            await wait_converged(stores)
        took = trio.current_time() - healed_at
        assert took < CONVERGENCE_BOUND
        print(f"converged {took:.2f} mock-s after heal; {len(stores[0].log)} deltas")

        vvs = {tuple(sorted(s.log.version_vector().items())) for s in stores}
        assert len(vvs) == 1
        assert stores[0].counter("steps").value() == totals["steps"]
        assert len(stores[0].log) == sum(s.statistics().local_writes for s in stores)
        for s in stores:
            stats = s.statistics()
            assert stats.rejected == 0 and stats.equivocations == 0
            assert s.doc("run/abc").items() == stores[0].doc("run/abc").items()
        assert net.statistics().failed > 0  # the partition really cut calls


def forged_blobs(victim: Identity) -> dict[str, bytes]:
    """Three forgeries of a delta that would set run/abc["lr"] to "pwned"."""
    mallory = Identity.from_seed(b"mallory")
    op = Op(DocKind.MAP, "run/abc", LwwMap.set_delta("lr", "pwned", Timestamp(2**50, 0,
                                                                              victim.peer_id.raw)))
    # 1. a non-member: right signature, wrong swarm key.
    outsider_op = Op(DocKind.MAP, "run/abc",
                     LwwMap.set_delta("lr", "pwned", Timestamp(2**50, 0, mallory.peer_id.raw)))
    outsider = seal(mallory, SwarmKey(b"not-the-swarm-key-at-all-32bytes"), 1, (outsider_op,))
    # 2. a member forging the victim's delta: victim's key carried, signature by mallory.
    real = seal(victim, SWARM_KEY, 10**6, (op,))
    signed = decode_untrusted(real.blob)
    bad_sig = encode(dataclasses.replace(signed, signature=mallory.sign(real.digest)))
    # 3. a member claiming the victim's id while carrying (and signing with) its own key.
    body = dataclasses.replace(decode_untrusted(signed.body), author=victim.peer_id.raw)
    raw = encode(body)
    digest = digest_of(raw)
    mismatch = encode(dataclasses.replace(
        signed, body=raw, public_key=mallory.public_key, signature=mallory.sign(digest),
        proof=membership_proof(SWARM_KEY, digest),
    ))
    return {"membership": outsider.blob, "signature": bad_sig, "author": mismatch}


async def test_forged_deltas_rejected_everywhere_and_counted(autojump_clock: MockClock) -> None:
    async with open_cluster(10, seed=2) as (net, nodes):
        stores = [n.store for n in nodes]
        for i, node in enumerate(nodes):
            node.store.doc("run/abc").set("lr", 0.01 * (i + 1))
        forged = forged_blobs(nodes[0].identity)

        # The attacker is reachable on the network: it pushes forgeries to everyone
        # and also hands them out when anyone pulls from it (gossip relay path).
        attacker = net.endpoint(PeerId.from_public_key(b"a" * 32))

        async def serve_sync(peer: PeerId, payload: bytes) -> bytes:
            return encode(SyncReply(CRDT_PROTOCOL_VERSION, (), (), tuple(forged.values()), False))

        attacker.register(METHOD_SYNC, serve_sync)
        push = encode(DeltaPush(CRDT_PROTOCOL_VERSION, tuple(forged.values())))
        for node in nodes:
            await attacker.notify(node.identity.peer_id, METHOD_PUSH, push)

        with trio.fail_after(CONVERGENCE_BOUND):
            await wait_converged(stores)
        await trio.sleep(5.0)  # let more gossip rounds hit the attacker's sync handler
        for store in stores:
            stats = store.statistics()
            assert stats.rejected_membership >= 1
            assert stats.rejected_signature >= 1
            assert stats.rejected_author >= 1
            assert stats.accepted == len(nodes) - 1  # only the honest writes
            assert store.doc("run/abc").get("lr") != "pwned"
        assert converged(stores)
        pulled_from_attacker = sum(s.statistics().rejected for s in stores) - 3 * len(stores)
        assert pulled_from_attacker > 0
