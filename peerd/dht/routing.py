"""Kademlia routing table: 256 k-buckets over the XOR metric (sans-I/O).

Node ids are the raw 32-byte peer ids read as big-endian integers. Bucket ``i``
holds contacts whose XOR distance from us has its highest set bit at ``i``.
Entries are kept least-recently-seen first. A full bucket never drops a live
contact for a newcomer: ``observe`` returns an ``EvictionCheck`` asking the
driver to ping the least-recently-seen entry, and ``ping_result`` evicts it only
if that ping failed (long-lived peers are the most likely to stay up).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from peerd.identity import PeerId

ID_BITS = 256
MAX_ADDRESSES = 8
MAX_ADDRESS_LEN = 256


def node_id(peer: PeerId) -> int:
    return int.from_bytes(peer.raw, "big")


def key_id(key: bytes) -> int:
    return int.from_bytes(key, "big")


def bucket_index(own: int, other: int) -> int:
    """Index of the bucket ``other`` falls in (-1 for ``own`` itself)."""
    return (own ^ other).bit_length() - 1


@dataclass(frozen=True)
class Contact:
    """A peer and the addresses it says it is reachable at."""

    peer_id: PeerId
    addresses: tuple[str, ...]
    # The id as an integer, computed once: XOR distances are taken constantly.
    nid: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.addresses) > MAX_ADDRESSES:
            raise ValueError(f"at most {MAX_ADDRESSES} addresses per contact")
        if any(len(a) > MAX_ADDRESS_LEN for a in self.addresses):
            raise ValueError("address too long")
        object.__setattr__(self, "nid", node_id(self.peer_id))


@dataclass(frozen=True)
class EvictionCheck:
    """Driver action: ping ``stale``; report with ``RoutingTable.ping_result``."""

    stale: Contact
    candidate: Contact


@dataclass(frozen=True)
class RoutingStatistics:
    contacts: int
    nonempty_buckets: int
    replacements: int
    pending_pings: int
    evictions: int
    removed_after_failures: int


class _Entry:
    __slots__ = ("contact", "failures", "last_seen")

    def __init__(self, contact: Contact, now: float) -> None:
        self.contact = contact
        self.last_seen = now
        self.failures = 0


class _Bucket:
    __slots__ = ("entries", "last_refreshed", "pending", "replacements")

    def __init__(self, now: float) -> None:
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently seen first
        self.replacements: OrderedDict[bytes, Contact] = OrderedDict()  # newest last
        self.pending: bytes | None = None  # raw id of the entry being pinged
        self.last_refreshed = now


class RoutingTable:
    """k-buckets around ``own``; every method is pure bookkeeping given ``now``."""

    def __init__(
        self, own: PeerId, *, k: int = 20, max_failures: int = 2, fresh_window: float = 30.0,
        now: float = 0.0,
    ) -> None:
        self.own = own
        self.own_nid = node_id(own)
        self.k = k
        self.max_failures = max_failures
        # A least-recently-seen entry heard from within this many seconds is alive
        # enough: the newcomer waits in the replacement cache without a ping.
        self.fresh_window = fresh_window
        self._created = now
        self._buckets: dict[int, _Bucket] = {}
        self._evictions = 0
        self._removed = 0

    # ------------------------------------------------------------ updates

    def _bucket(self, index: int) -> _Bucket:
        b = self._buckets.get(index)
        if b is None:
            b = self._buckets[index] = _Bucket(self._created)
        return b

    def observe(self, contact: Contact, now: float) -> EvictionCheck | None:
        """``contact`` was just heard from. Returns a ping request when its bucket is full."""
        index = bucket_index(self.own_nid, contact.nid)
        if index < 0:
            return None
        bucket = self._bucket(index)
        raw = contact.peer_id.raw
        entry = bucket.entries.get(raw)
        if entry is not None:
            entry.contact = contact
            entry.last_seen = now
            entry.failures = 0
            bucket.entries.move_to_end(raw)
            return None
        if len(bucket.entries) < self.k:
            bucket.entries[raw] = _Entry(contact, now)
            bucket.replacements.pop(raw, None)
            return None
        bucket.replacements[raw] = contact
        bucket.replacements.move_to_end(raw)
        while len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)
        if bucket.pending is not None:
            return None  # one check per bucket at a time; the newcomer waits as a replacement
        stale_raw, stale = next(iter(bucket.entries.items()))
        if now - stale.last_seen < self.fresh_window:
            return None
        bucket.pending = stale_raw
        return EvictionCheck(stale=stale.contact, candidate=contact)

    def ping_result(self, peer: PeerId, alive: bool, now: float) -> None:
        """Outcome of an ``EvictionCheck``: keep the old entry if alive, else replace it."""
        index = bucket_index(self.own_nid, node_id(peer))
        bucket = self._buckets.get(index)
        if bucket is None:
            return
        if bucket.pending == peer.raw:
            bucket.pending = None
        entry = bucket.entries.get(peer.raw)
        if entry is None:
            return
        if alive:
            entry.last_seen = now
            entry.failures = 0
            bucket.entries.move_to_end(peer.raw)
        else:
            self._evictions += 1
            self._remove_from(bucket, peer.raw, now)

    def record_failure(self, peer: PeerId, now: float) -> None:
        """A request to ``peer`` failed. Drop it after ``max_failures`` in a row, or at
        once when a fresher replacement is waiting."""
        bucket = self._buckets.get(bucket_index(self.own_nid, node_id(peer)))
        entry = bucket.entries.get(peer.raw) if bucket is not None else None
        if bucket is None or entry is None:
            return
        entry.failures += 1
        if entry.failures >= self.max_failures or bucket.replacements:
            self._removed += 1
            self._remove_from(bucket, peer.raw, now)

    def remove(self, peer: PeerId, now: float) -> None:
        bucket = self._buckets.get(bucket_index(self.own_nid, node_id(peer)))
        if bucket is not None and peer.raw in bucket.entries:
            self._remove_from(bucket, peer.raw, now)

    def _remove_from(self, bucket: _Bucket, raw: bytes, now: float) -> None:
        del bucket.entries[raw]
        if bucket.pending == raw:
            bucket.pending = None
        if bucket.replacements:
            new_raw, contact = bucket.replacements.popitem(last=True)
            bucket.entries[new_raw] = _Entry(contact, now)

    def add_unverified(self, contact: Contact, now: float) -> bool:
        """Insert a contact not yet heard from (e.g. loaded from disk) only if there is room."""
        index = bucket_index(self.own_nid, contact.nid)
        if index < 0:
            return False
        bucket = self._bucket(index)
        if contact.peer_id.raw in bucket.entries or len(bucket.entries) >= self.k:
            return False
        bucket.entries[contact.peer_id.raw] = _Entry(contact, now)
        bucket.entries.move_to_end(contact.peer_id.raw, last=False)  # least trusted first
        return True

    # ------------------------------------------------------------ queries

    def get(self, peer: PeerId) -> Contact | None:
        bucket = self._buckets.get(bucket_index(self.own_nid, node_id(peer)))
        entry = bucket.entries.get(peer.raw) if bucket is not None else None
        return entry.contact if entry is not None else None

    def closest(self, target: bytes, count: int) -> list[Contact]:
        """Up to ``count`` known contacts nearest to ``target``, nearest first."""
        t = key_id(target)
        i = bucket_index(self.own_nid, t)
        # XOR geometry: contacts in the target's own bucket are nearest, then all
        # buckets below it (distance's top bit is i), then buckets above in order.
        present = sorted(self._buckets)
        groups: list[list[int]] = [[i], [j for j in present if j < i]] if i >= 0 else []
        groups.extend([j] for j in present if j > i)
        out: list[Contact] = []
        for group in groups:
            found = [e.contact for j in group if j in self._buckets
                     for e in self._buckets[j].entries.values()]
            if found:
                found.sort(key=lambda c: c.nid ^ t)
                out.extend(found)
                if len(out) >= count:
                    break
        return out[:count]

    def contacts(self) -> list[Contact]:
        return [e.contact for b in self._buckets.values() for e in b.entries.values()]

    def bucket_contents(self, index: int) -> list[Contact]:
        """Contacts of bucket ``index``, least recently seen first (for tests and tools)."""
        bucket = self._buckets.get(index)
        return [e.contact for e in bucket.entries.values()] if bucket is not None else []

    def __len__(self) -> int:
        return sum(len(b.entries) for b in self._buckets.values())

    # ------------------------------------------------------------ refresh

    def touch(self, target: bytes, now: float) -> None:
        """A lookup for ``target`` ran: the bucket covering it counts as refreshed."""
        index = bucket_index(self.own_nid, key_id(target))
        if index >= 0:
            self._bucket(index).last_refreshed = now

    def buckets_to_refresh(self, now: float, interval: float) -> list[int]:
        """Buckets not looked up in for ``interval``. Buckets nearer than our nearest
        neighbour's are skipped: they are empty by construction of the id space."""
        nonempty = [i for i, b in self._buckets.items() if b.entries]
        if not nonempty:
            return []
        lowest = min(nonempty)
        return [
            i for i in range(lowest, ID_BITS)
            if now - (self._buckets[i].last_refreshed if i in self._buckets else self._created)
            >= interval
        ]

    def refresh_target(self, index: int, random_bytes: bytes) -> bytes:
        """A random id inside bucket ``index`` (``random_bytes``: 32 bytes of entropy)."""
        r = key_id(random_bytes) & ((1 << index) - 1)
        target = (self.own_nid ^ (1 << index)) & ~((1 << index) - 1) | r
        return target.to_bytes(32, "big")

    def statistics(self) -> RoutingStatistics:
        return RoutingStatistics(
            contacts=len(self),
            nonempty_buckets=sum(1 for b in self._buckets.values() if b.entries),
            replacements=sum(len(b.replacements) for b in self._buckets.values()),
            pending_pings=sum(1 for b in self._buckets.values() if b.pending is not None),
            evictions=self._evictions,
            removed_after_failures=self._removed,
        )
