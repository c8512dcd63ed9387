"""Pure tests of the iterative lookup state machine, driven by a tiny event loop."""

from __future__ import annotations

import hashlib
import heapq
import random

import pytest

from peerd.dht.lookup import Lookup, LookupResult, QueryState
from peerd.dht.routing import Contact, RoutingTable, key_id
from peerd.identity import PeerId


def peer(n: int) -> PeerId:
    return PeerId(hashlib.sha256(b"lk-%d" % n).digest())


class Network:
    """N nodes with routing tables that each saw a random half of the others."""

    def __init__(self, n: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.contacts = [Contact(peer(i), (f"n{i}",)) for i in range(n)]
        self.tables: dict[bytes, RoutingTable] = {}
        for c in self.contacts:
            table = RoutingTable(c.peer_id, k=20)
            for other in rng.sample(self.contacts, n // 2):
                table.observe(other, 0.0)
            self.tables[c.peer_id.raw] = table
        self.dead: set[bytes] = set()
        self.holders: set[bytes] = set()
        self.latency = {c.peer_id.raw: rng.uniform(0.01, 0.2) for c in self.contacts}

    def run(self, lookup: Lookup, max_in_flight: list[int]) -> LookupResult:
        """Drive ``lookup`` to completion; records the in-flight count at every step."""
        now = 0.0
        events: list[tuple[float, int, bytes]] = []
        seq = 0
        for _ in range(10_000):
            step = lookup.poll(now)
            max_in_flight.append(lookup.in_flight)
            if step.done:
                return lookup.result()
            for c in step.send:
                if c.peer_id.raw not in self.dead:
                    heapq.heappush(events, (now + self.latency[c.peer_id.raw], seq, c.peer_id.raw))
                    seq += 1
            wake = step.wake_at if step.wake_at is not None else float("inf")
            if events and events[0][0] <= wake:
                now, _, raw = heapq.heappop(events)
                answer = self.tables[raw].closest(lookup.target, 20)
                lookup.on_response(PeerId(raw), answer, now, has_value=raw in self.holders)
            else:
                now = wake
        raise AssertionError("lookup did not finish")

    def true_closest(self, target: bytes, exclude: PeerId, count: int) -> list[Contact]:
        alive = [c for c in self.contacts
                 if c.peer_id.raw not in self.dead and c.peer_id != exclude]
        return sorted(alive, key=lambda c: c.nid ^ key_id(target))[:count]


NET = Network(400)


def start(net: Network, origin: int, target: bytes, **kw: object) -> Lookup:
    me = net.contacts[origin].peer_id
    seeds = net.tables[me.raw].closest(target, 20)
    return Lookup(me, target, seeds, k=20, alpha=3, request_timeout=1.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("i", range(8))
def test_lookup_converges_to_true_closest(i: int) -> None:
    target = hashlib.sha256(b"target-%d" % i).digest()
    flights: list[int] = []
    result = NET.run(start(NET, i, target), flights)
    expected = NET.true_closest(target, NET.contacts[i].peer_id, 20)
    assert list(result.closest) == expected
    assert max(flights) <= 3
    assert result.failures == 0 and result.messages >= 20 and result.hops >= 1


def test_never_more_than_alpha_in_flight_and_sends_at_most_alpha_at_start() -> None:
    target = hashlib.sha256(b"alpha").digest()
    lk = start(NET, 3, target)
    step = lk.poll(0.0)
    assert len(step.send) == 3 and lk.in_flight == 3 and step.wake_at == pytest.approx(1.0)
    assert lk.poll(0.5).send == ()  # nothing answered yet: no new requests


def test_timeouts_fail_requests_and_lookup_routes_around_dead_nodes() -> None:
    net = Network(300, seed=7)
    rng = random.Random(3)
    net.dead = {c.peer_id.raw for c in rng.sample(net.contacts[1:], 90)}
    target = hashlib.sha256(b"dead").digest()
    flights: list[int] = []
    result = net.run(start(net, 0, target), flights)
    assert result.failures > 0
    assert max(flights) <= 3
    assert all(c.peer_id.raw not in net.dead for c in result.closest)
    expected = net.true_closest(target, net.contacts[0].peer_id, 20)
    assert len(set(result.closest) & set(expected)) >= 18


def test_poll_reports_timed_out_request_once_at_its_deadline() -> None:
    target = hashlib.sha256(b"timeout").digest()
    lk = start(NET, 5, target)
    sent = lk.poll(0.0).send
    step = lk.poll(0.999)
    assert step.timed_out == ()
    step = lk.poll(1.0)
    assert set(step.timed_out) == set(sent)
    assert all(lk.state_of(c.peer_id) is QueryState.FAILED for c in sent)
    assert len(step.send) == 3  # replaced by the next candidates
    assert lk.poll(1.0).timed_out == ()


def test_late_answer_after_timeout_still_counts() -> None:
    target = hashlib.sha256(b"late").digest()
    lk = start(NET, 6, target)
    first = lk.poll(0.0).send[0]
    lk.poll(1.0)
    lk.on_response(first.peer_id, [], 1.5)
    assert lk.state_of(first.peer_id) is QueryState.SUCCEEDED


def test_value_lookup_stops_at_quorum() -> None:
    net = Network(300, seed=11)
    target = hashlib.sha256(b"value").digest()
    holders = net.true_closest(target, net.contacts[0].peer_id, 20)
    net.holders = {c.peer_id.raw for c in holders}
    flights: list[int] = []
    node_lookup = net.run(start(net, 0, target), flights)
    result = net.run(start(net, 0, target, value_quorum=2), flights)
    assert len(result.holders) >= 2
    assert result.messages < node_lookup.messages


def test_empty_seed_list_finishes_immediately() -> None:
    lk = Lookup(peer(1), b"\x00" * 32, [], k=20)
    step = lk.poll(0.0)
    assert step.done and step.send == () and lk.result().closest == ()


def test_candidate_list_stays_bounded_under_contact_floods() -> None:
    lk = Lookup(peer(1), b"\x00" * 32, [Contact(peer(2), ("a",))], k=4, max_candidates=16)
    lk.poll(0.0)
    flood = [Contact(peer(1000 + i), ("x",)) for i in range(500)]
    lk.on_response(peer(2), flood, 0.1)
    assert len(lk._by_id) <= 16
