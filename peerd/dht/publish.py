"""Publishing, reading and republishing records through a ``Dht`` driver.

A put signs the value, finds the k nodes nearest its key and stores it at each
(and here, when this node is one of them). The publisher remembers what it put
and re-signs it with a fresh expiry and higher ``seq`` once
``republish_fraction`` of its TTL has passed, so records outlive the nodes that
stored them while stored copies of abandoned records simply expire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from peerd.dht.lookup import LookupResult
from peerd.dht.records import (
    KEY_BYTES,
    NODE_RECORD_SUBKEY,
    Record,
    make_record,
    merge_records,
    validate,
)
from peerd.dht.routing import MAX_ADDRESSES, key_id
from peerd.errors import ProtocolError
from peerd.identity import PeerId

if TYPE_CHECKING:
    from peerd.dht.node import Dht

REPUBLISH_CONCURRENCY = 8


@dataclass(frozen=True)
class Published:
    value: Any
    ttl: float
    subkey: bytes | None
    seq: int
    published_at: float


@dataclass(frozen=True)
class GetResult:
    values: dict[bytes | None, Any]
    lookup: LookupResult


class Publisher:
    """The records this node publishes, and the read paths that merge replicas."""

    def __init__(self, dht: Dht) -> None:
        self._dht = dht
        self._published: dict[tuple[bytes, bytes | None], Published] = {}

    def __len__(self) -> int:
        return len(self._published)

    async def put(
        self, key: bytes, value: Any, ttl: float, subkey: bytes | None, *, republish: bool
    ) -> int:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError("DHT keys are 32 bytes (e.g. sha256 of a name)")
        wall = self._dht.wall()
        previous = self._published.get((key, subkey))
        # Milliseconds since the epoch keep seq increasing across restarts of this node.
        seq = max(previous.seq + 1 if previous else 0, int(wall * 1000))
        record = make_record(self._dht.identity, key, value, ttl=ttl, now=wall, subkey=subkey,
                             seq=seq)
        reason = validate(record, wall, self._dht.config.limits)
        if reason is not None:
            raise ValueError(f"record refused by local limits: {reason.value}")
        if republish:
            self._published[(key, subkey)] = Published(value, ttl, subkey, seq, wall)
        return await self.store_everywhere(record)

    def unpublish(self, key: bytes, subkey: bytes | None) -> None:
        self._published.pop((key, subkey), None)

    async def store_everywhere(self, record: Record) -> int:
        dht = self._dht
        result, _ = await dht.lookup(record.key)
        targets = list(result.closest[: dht.config.k])
        stored = 0
        t = key_id(record.key)
        if len(targets) < dht.config.k or dht.me.nid ^ t < targets[-1].nid ^ t:
            stored += dht.store.store(record, dht.wall()) is None
        accepted: list[bool] = []

        async def store_one(contact: Any) -> None:
            accepted.append(await dht.store_at(contact, record))

        async with trio.open_nursery() as nursery:
            for contact in targets:
                nursery.start_soon(store_one, contact)
        return stored + sum(accepted)

    async def republish_due(self) -> int:
        """Re-sign and re-store every record past its republish point; returns how many."""
        dht = self._dht
        wall = dht.wall()
        fraction = dht.config.republish_fraction
        due = [(slot, p) for slot, p in self._published.items()
               if wall - p.published_at >= p.ttl * fraction]
        limiter = trio.CapacityLimiter(REPUBLISH_CONCURRENCY)

        async def again(key: bytes, p: Published) -> None:
            async with limiter:
                await self.put(key, p.value, p.ttl, p.subkey, republish=True)

        async with trio.open_nursery() as nursery:
            for (key, _), p in due:
                nursery.start_soon(again, key, p)
        return len(due)

    async def publish_node_record(self) -> None:
        ttl = self._dht.config.node_record_ttl
        if ttl is not None:
            await self.put(self._dht.peer_id.raw, list(self._dht.addresses), ttl,
                           NODE_RECORD_SUBKEY, republish=True)

    async def get_detailed(self, key: bytes) -> GetResult:
        dht = self._dht
        result, answers = await dht.lookup(key, values=True, quorum=dht.config.value_quorum)
        local = dht.store.get(key, dht.wall())
        merged = merge_records(([local] if local else []) + answers)
        values: dict[bytes | None, Any] = {}
        for subkey, rec in merged.items():
            try:
                values[subkey] = rec.decoded_value()
            except ProtocolError:
                continue  # validate() already decoded it; unreachable for verified records
        return GetResult(values, result)

    async def find_peer(self, peer: PeerId) -> tuple[str, ...] | None:
        dht = self._dht
        if peer == dht.peer_id:
            return dht.addresses
        known = dht.table.get(peer)
        if known is not None:
            return known.addresses

        def is_node_record(rec: Record) -> bool:
            return rec.subkey == NODE_RECORD_SUBKEY and rec.publisher == peer.raw

        result, answers = await dht.lookup(peer.raw, values=True, quorum=1, accept=is_node_record)
        for records in answers:
            for rec in records:
                addresses = _addresses_of(rec)
                if addresses:
                    return addresses
        for contact in result.closest:
            if contact.peer_id == peer:
                return contact.addresses  # it answered us there, so it is reachable there
        return None


def _addresses_of(record: Record) -> tuple[str, ...] | None:
    try:
        value = record.decoded_value()
    except ProtocolError:
        return None
    if (not isinstance(value, list) or len(value) > MAX_ADDRESSES
            or not all(isinstance(a, str) for a in value)):
        return None
    return tuple(value)
