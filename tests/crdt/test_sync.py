"""The sans-I/O sync core, driven by hand: exchanges, chunking, timing, hostile input."""

from __future__ import annotations

import random

import pytest

from crdt.counter import PNCounter
from crdt.delta import Op, seal
from crdt.messages import CRDT_PROTOCOL_VERSION, DocKind, SyncRequest
from crdt.store import Store
from crdt.sync import MIN_MESSAGE_BYTES, Pull, Push, SyncConfig, SyncCore
from peerd.errors import ProtocolError
from peerd.identity import Identity
from peerd.wire import decode_untrusted, encode

from .cluster import SWARM_KEY

IDS = [Identity.from_seed(b"sync-%d" % i) for i in range(4)]
SMALL = SyncConfig(max_message_bytes=MIN_MESSAGE_BYTES)


def node(i: int, config: SyncConfig = SMALL) -> tuple[Store, SyncCore]:
    store = Store.open(None, IDS[i], SWARM_KEY, wall_clock=lambda: 1_700_000_000.0)
    return store, SyncCore(store.log, store.peer_id, config, random.Random(i))


def exchange(a: tuple[Store, SyncCore], b: tuple[Store, SyncCore]) -> tuple[int, int]:
    """A pulls from B until done, then pushes what B lacks. Returns (replies, max size)."""
    (sa, ca), (sb, cb) = a, b
    replies, biggest = 0, 0
    while True:
        reply = cb.handle_request(ca.make_request())
        replies += 1
        biggest = max(biggest, len(reply))
        outcome = ca.handle_reply(reply)
        sa.ingest(outcome.deltas)
        if not outcome.more:
            break
        assert replies < 100
    for push in ca.pushes_for(outcome.remote_vv, outcome.remote_held):
        biggest = max(biggest, len(push))
        sb.ingest(cb.handle_push(push))
    return replies, biggest


def test_one_exchange_makes_two_replicas_equal() -> None:
    a, b = node(0), node(1)
    for i in range(20):
        a[0].doc("run/abc").set(f"a{i}", i)
        b[0].counter("steps").increment(i + 1)
    exchange(a, b)
    assert a[0].snapshot() == b[0].snapshot()
    assert b[0].counter("steps").value() == 210 and len(a[0].doc("run/abc").items()) == 20
    # Nothing left to send: a second exchange moves no deltas.
    before = (a[0].statistics().accepted, b[0].statistics().accepted)
    exchange(a, b)
    assert (a[0].statistics().accepted, b[0].statistics().accepted) == before


def test_large_state_streams_in_bounded_chunks() -> None:
    a, b = node(0), node(1)
    blob = b"x" * 2000
    for i in range(400):  # ~0.9 MB of deltas: needs several chunks each way
        a[0].doc("big").set(f"k{i}", blob)
        b[0].doc("big2").set(f"k{i}", blob)
    replies, biggest = exchange(a, b)
    assert replies >= 3
    assert biggest <= SMALL.max_message_bytes
    assert a[0].snapshot() == b[0].snapshot()


def test_poll_schedules_gossip_and_pushes_local_writes_once() -> None:
    store, core = node(0, SyncConfig(gossip_fanout=2, push_fanout=2, push_delay=0.05))
    peers = [i.peer_id for i in IDS]
    assert core.poll(0.0, peers) == []  # first poll only staggers the schedule
    first = core.next_wakeup()
    assert 0.0 <= first <= 1.0
    pulls = core.poll(first, peers)
    assert len(pulls) == 2 and all(isinstance(p, Pull) for p in pulls)
    assert store.peer_id not in {p.peer for p in pulls}

    store.counter("c").increment()
    store.counter("c").increment()
    core.local_write(first + 0.01)
    assert core.next_wakeup() == pytest.approx(first + 0.06)
    assert core.poll(first + 0.02, peers) == []
    pushes = [p for p in core.poll(first + 0.06, peers) if isinstance(p, Push)]
    assert len(pushes) == 2 and pushes[0].peer != pushes[1].peer
    assert len(decode_untrusted(pushes[0].payload).deltas) == 2
    store.counter("c").increment()
    core.local_write(first + 0.1)
    (push, _) = core.poll(first + 0.2, peers)
    assert isinstance(push, Push) and len(decode_untrusted(push.payload).deltas) == 1


def test_hostile_requests_raise_protocol_error_and_are_counted() -> None:
    store, core = node(0)
    store.counter("c").increment()
    bad = [
        b"\x00garbage",
        encode(SyncRequest(CRDT_PROTOCOL_VERSION + 1, (), (), 1 << 20)),
        encode(SyncRequest(CRDT_PROTOCOL_VERSION, ((b"short", 1),), (), 1 << 20)),
        encode(SyncRequest(CRDT_PROTOCOL_VERSION, ((b"a" * 32, -1),), (), 1 << 20)),
        encode(SyncRequest(CRDT_PROTOCOL_VERSION, (), ((b"a" * 32, 5, 4),), 1 << 20)),
    ]
    for body in bad:
        with pytest.raises(ProtocolError):
            core.handle_request(body)
    assert core.statistics().malformed == len(bad)
    # A tiny requested budget is raised to the minimum; a huge one is capped.
    reply = decode_untrusted(core.handle_request(encode(SyncRequest(1, (), (), 1))))
    assert len(reply.deltas) == 1 and not reply.more


def test_sparse_hostile_seq_does_not_cost_a_huge_walk() -> None:
    a, b = node(0), node(1)
    b[0].counter("c").increment()
    a[0].ingest(b[0].log.missing_for({}, 1 << 20).blobs)
    # A member may sign a delta with an absurd seq; serving it must not walk 2**62 slots.
    op = Op(DocKind.COUNTER, "c", PNCounter({IDS[1].peer_id.raw: 5}))
    assert a[0].ingest([seal(IDS[1], SWARM_KEY, 2**62, (op,)).blob]).accepted == 1
    claim = ((IDS[3].peer_id.raw, 2**62), (IDS[1].peer_id.raw, 0))
    reply = decode_untrusted(a[1].handle_request(encode(SyncRequest(1, claim, (), 1 << 20))))
    assert len(reply.deltas) == 2
    assert a[0].log.version_vector()[IDS[1].peer_id.raw] == 1  # the gap stays visible
    assert a[0].log.lacks_from({IDS[3].peer_id.raw: 5})
