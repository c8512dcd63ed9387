"""Pure tests of the k-bucket routing table."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.dht.routing import Contact, RoutingTable, bucket_index, key_id, node_id
from peerd.identity import PeerId


def pid(n: int) -> PeerId:
    return PeerId(hashlib.sha256(b"rt-%d" % n).digest())


def contact(peer: PeerId) -> Contact:
    return Contact(peer, (f"addr-{peer.raw[:4].hex()}",))


def with_prefix(own: PeerId, index: int, salt: int) -> PeerId:
    """A peer id that falls in bucket ``index`` of ``own``."""
    rnd = key_id(hashlib.sha256(b"salt-%d" % salt).digest()) & ((1 << index) - 1)
    nid = ((node_id(own) ^ (1 << index)) >> index << index) | rnd
    return PeerId(nid.to_bytes(32, "big"))


OWN = pid(0)


def test_bucket_placement_follows_highest_differing_bit() -> None:
    table = RoutingTable(OWN, k=20)
    for index in (0, 1, 7, 100, 254, 255):
        peer = with_prefix(OWN, index, index)
        assert bucket_index(node_id(OWN), node_id(peer)) == index
        table.observe(contact(peer), now=1.0)
        assert table.bucket_contents(index) == [contact(peer)]
    assert len(table) == 6


def test_own_id_is_never_added() -> None:
    table = RoutingTable(OWN)
    assert table.observe(contact(OWN), 0.0) is None
    assert len(table) == 0


def fill_bucket(table: RoutingTable, index: int, count: int, now: float = 0.0) -> list[Contact]:
    out = [contact(with_prefix(OWN, index, 1000 + i)) for i in range(count)]
    for c in out:
        assert table.observe(c, now) is None
    return out


def test_full_bucket_asks_to_ping_least_recently_seen() -> None:
    table = RoutingTable(OWN, k=4, fresh_window=0.0)
    first, *_ = fill_bucket(table, 200, 4)
    newcomer = contact(with_prefix(OWN, 200, 99))
    check = table.observe(newcomer, now=10.0)
    assert check is not None and check.stale == first and check.candidate == newcomer
    # Nothing changes until the ping's outcome is known.
    assert newcomer not in table.bucket_contents(200) and first in table.bucket_contents(200)
    # Only one outstanding check per bucket.
    assert table.observe(contact(with_prefix(OWN, 200, 98)), now=11.0) is None


def test_alive_least_recently_seen_is_kept() -> None:
    table = RoutingTable(OWN, k=4, fresh_window=0.0)
    first, second, *_ = fill_bucket(table, 200, 4)
    newcomer = contact(with_prefix(OWN, 200, 99))
    check = table.observe(newcomer, now=10.0)
    assert check is not None
    table.ping_result(first.peer_id, alive=True, now=11.0)
    contents = table.bucket_contents(200)
    assert newcomer not in contents
    assert contents[-1] == first and contents[0] == second  # moved to most recently seen


def test_dead_least_recently_seen_is_evicted_for_newcomer() -> None:
    table = RoutingTable(OWN, k=4, fresh_window=0.0)
    first, *_ = fill_bucket(table, 200, 4)
    newcomer = contact(with_prefix(OWN, 200, 99))
    assert table.observe(newcomer, now=10.0) is not None
    table.ping_result(first.peer_id, alive=False, now=11.0)
    contents = table.bucket_contents(200)
    assert first not in contents and newcomer in contents and len(contents) == 4
    assert table.statistics().evictions == 1


def test_recently_seen_entries_are_not_pinged() -> None:
    table = RoutingTable(OWN, k=2, fresh_window=30.0)
    fill_bucket(table, 10, 2, now=100.0)
    assert table.observe(contact(with_prefix(OWN, 10, 99)), now=110.0) is None
    assert table.observe(contact(with_prefix(OWN, 10, 98)), now=140.0) is not None


def test_failures_remove_contact_and_promote_replacement() -> None:
    table = RoutingTable(OWN, k=2, max_failures=2, fresh_window=1e9)
    a, b = fill_bucket(table, 50, 2)
    table.record_failure(a.peer_id, 1.0)
    assert a in table.bucket_contents(50)  # one failure, no replacement waiting: keep
    table.record_failure(a.peer_id, 2.0)
    assert a not in table.bucket_contents(50)
    spare = contact(with_prefix(OWN, 50, 77))
    table.observe(spare, 3.0)
    table.observe(contact(with_prefix(OWN, 50, 78)), 3.0)  # bucket full again -> cached
    table.record_failure(b.peer_id, 4.0)  # a replacement waits: drop at once
    assert b not in table.bucket_contents(50) and len(table.bucket_contents(50)) == 2


def test_seen_again_moves_to_tail_and_updates_addresses() -> None:
    table = RoutingTable(OWN, k=3)
    a, b, _ = fill_bucket(table, 30, 3)
    moved = Contact(a.peer_id, ("new-address",))
    table.observe(moved, 5.0)
    assert table.bucket_contents(30)[-1] == moved and table.bucket_contents(30)[0] == b
    assert table.get(a.peer_id) == moved


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=80, unique=True),
       st.binary(min_size=32, max_size=32), st.integers(1, 30))
def test_closest_matches_brute_force(raws: list[bytes], target: bytes, count: int) -> None:
    table = RoutingTable(OWN, k=200)
    for raw in raws:
        table.observe(Contact(PeerId(raw), ()), 0.0)
    expected = sorted(table.contacts(), key=lambda c: c.nid ^ key_id(target))[:count]
    assert table.closest(target, count) == expected


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 255), st.binary(min_size=32, max_size=32))
def test_refresh_target_lies_in_its_bucket(index: int, entropy: bytes) -> None:
    table = RoutingTable(OWN)
    target = table.refresh_target(index, entropy)
    assert bucket_index(node_id(OWN), key_id(target)) == index


def test_refresh_schedule_covers_idle_buckets_from_nearest_neighbour() -> None:
    table = RoutingTable(OWN, now=0.0)
    table.observe(contact(with_prefix(OWN, 250, 1)), 0.0)
    table.observe(contact(with_prefix(OWN, 253, 2)), 0.0)
    assert table.buckets_to_refresh(now=100.0, interval=3600.0) == []
    assert table.buckets_to_refresh(now=3600.0, interval=3600.0) == list(range(250, 256))
    table.touch(table.refresh_target(252, b"\x01" * 32), now=3600.0)
    assert 252 not in table.buckets_to_refresh(now=3601.0, interval=3600.0)


def test_add_unverified_only_fills_free_room() -> None:
    table = RoutingTable(OWN, k=2)
    fill_bucket(table, 40, 2)
    assert not table.add_unverified(contact(with_prefix(OWN, 40, 5)), 0.0)
    assert table.add_unverified(contact(with_prefix(OWN, 41, 5)), 0.0)
