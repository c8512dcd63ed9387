"""The trio driver of the DHT: owns RPC calls, timers and background tasks.

Everything it decides comes from the sans-I/O cores (``RoutingTable``,
``Lookup``, ``RecordStore``, ``DhtService``); this module only moves bytes
between them and an ``RpcClient``, and keeps time. ``run()`` holds the
background work (ping-before-evict checks, expiry, republish, bucket refresh)
and must be running inside the owner's nursery for the node to stay healthy.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from peerd.dht.config import DhtConfig
from peerd.dht.lookup import Lookup, LookupResult
from peerd.dht.messages import (
    METHOD_FIND_NODE,
    METHOD_FIND_VALUE,
    METHOD_PING,
    METHOD_STORE,
    FindNodeRequest,
    FindValueRequest,
    PingRequest,
    StoreRequest,
    decode_request,
    decode_response,
    encode,
)
from peerd.dht.persist import load_contacts, save_contacts
from peerd.dht.publish import Publisher
from peerd.dht.records import Record, owned_subkey, validate
from peerd.dht.routing import Contact, EvictionCheck, RoutingTable
from peerd.dht.service import DhtService
from peerd.dht.storage import RecordStore
from peerd.dht.transport import PeerRef, RpcClient, parse_peer
from peerd.errors import PeerdError, ProtocolError
from peerd.identity import Identity, PeerId

log = logging.getLogger("peerd.dht")

PENDING_CHECKS = 64


@dataclass(frozen=True)
class DhtStatistics:
    peer_id: str
    contacts: int
    nonempty_buckets: int
    records_stored: int
    records_published: int
    lookups: int
    lookup_messages: int
    rpc_calls: int
    rpc_failures: int
    requests_served: int
    stores_rejected: int
    forged_records_dropped: int
    evictions: int


class Dht:
    """One node's DHT. Construct inside trio; serve ``handle`` from the RPC layer."""

    def __init__(
        self, identity: Identity, rpc: RpcClient, addresses: Sequence[str], *,
        config: DhtConfig | None = None, wall_clock: Callable[[], float] = time.time,
        data_dir: Path | None = None, rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config or DhtConfig()
        self._rpc = rpc
        self._addresses = tuple(addresses)
        self._wall = wall_clock
        self._data_dir = data_dir
        self._rng = rng or random.Random()
        self.table = RoutingTable(
            self.peer_id, k=self.config.k, max_failures=self.config.max_failures,
            now=trio.current_time(),
        )
        self.store = RecordStore(self.config.limits)
        self.service = DhtService(self.me, self.table, self.store, self.config.k)
        self.publisher = Publisher(self)
        self._checks_in, self._checks_out = trio.open_memory_channel[EvictionCheck](PENDING_CHECKS)
        self._lookups = 0
        self._lookup_messages = 0
        self._rpc_calls = 0
        self._rpc_failures = 0
        self._forged = 0

    @property
    def me(self) -> Contact:
        return Contact(self.peer_id, self._addresses)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Our reachable addresses changed (e.g. NAT traversal learnt a public one)."""
        self._addresses = tuple(addresses)
        self.service.me = self.me

    def wall(self) -> float:
        return self._wall()

    # ------------------------------------------------------------ inbound

    async def handle(self, sender: PeerRef, method: str, payload: bytes) -> bytes:
        """Entry point for the RPC layer; raises ``ProtocolError`` on bad input."""
        request = decode_request(method, payload)
        if sender.peer_id is None:
            raise ProtocolError("DHT requests need an authenticated sender")
        try:
            peer = parse_peer(sender.peer_id)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        handled = self.service.handle(
            peer, sender.address, request, trio.current_time(), self._wall()
        )
        if handled.check is not None:
            self._queue_check(handled.check)
        return encode(handled.response)

    # ------------------------------------------------------------ outbound

    async def call(self, contact: Contact, method: str, request: Any, timeout: float) -> Any:
        """Decoded response, or ``None`` if the peer did not answer properly."""
        if not contact.addresses:
            return None
        return await self._call_ref(
            PeerRef.of(contact.peer_id, contact.addresses[0]), method, request, timeout
        )

    async def _call_ref(self, ref: PeerRef, method: str, request: Any, timeout: float) -> Any:
        self._rpc_calls += 1
        try:
            payload = await self._rpc.call(ref, method, encode(request), timeout)
            return decode_response(method, payload)
        except PeerdError as exc:
            self._rpc_failures += 1
            log.debug("dht_call_failed peer=%s method=%s error=%s", ref.peer_id, method, exc)
            return None

    def _queue_check(self, check: EvictionCheck) -> None:
        try:
            self._checks_in.send_nowait(check)
        except trio.WouldBlock:
            # Too many checks queued: keep the old contact, as Kademlia prefers old peers.
            self.table.ping_result(check.stale.peer_id, True, trio.current_time())

    async def lookup(
        self, target: bytes, *, values: bool = False, quorum: int | None = None,
        accept: Callable[[Record], bool] | None = None,
    ) -> tuple[LookupResult, list[list[Record]]]:
        """Iterative lookup of ``target``; with ``values`` also the verified records
        that holders returned, one list per holder, nearest holder first."""
        now = trio.current_time()
        self.table.touch(target, now)
        cfg = self.config
        lk = Lookup(
            self.peer_id, target, self.table.closest(target, cfg.k), k=cfg.k, alpha=cfg.alpha,
            request_timeout=cfg.request_timeout, value_quorum=quorum if values else None,
        )
        found: dict[bytes, list[Record]] = {}
        send, recv = trio.open_memory_channel[tuple[Contact, Any]](math.inf)
        async with trio.open_nursery() as nursery:
            while True:
                step = lk.poll(trio.current_time())
                for c in step.timed_out:
                    self.table.record_failure(c.peer_id, trio.current_time())
                if step.done:
                    break
                for c in step.send:
                    nursery.start_soon(self._query, c, target, values, send)
                with trio.move_on_at(step.wake_at if step.wake_at is not None else math.inf):
                    contact, response = await recv.receive()
                    self._absorb(lk, contact, response, target, accept, found)
                    while True:
                        try:
                            contact, response = recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        self._absorb(lk, contact, response, target, accept, found)
            nursery.cancel_scope.cancel()
        result = lk.result()
        self._lookups += 1
        self._lookup_messages += result.messages
        return result, [found[c.peer_id.raw] for c in result.holders]

    async def _query(
        self, contact: Contact, target: bytes, values: bool,
        send: trio.MemorySendChannel[tuple[Contact, Any]],
    ) -> None:
        if values:
            request: Any = FindValueRequest(target, self._addresses)
            method = METHOD_FIND_VALUE
        else:
            request, method = FindNodeRequest(target, self._addresses), METHOD_FIND_NODE
        response = await self.call(contact, method, request, self.config.request_timeout)
        send.send_nowait((contact, response))

    def _absorb(
        self, lk: Lookup, contact: Contact, response: Any, target: bytes,
        accept: Callable[[Record], bool] | None, found: dict[bytes, list[Record]],
    ) -> None:
        now = trio.current_time()
        if response is None:
            lk.on_failure(contact.peer_id, now)
            self.table.record_failure(contact.peer_id, now)
            return
        check = self.table.observe(contact, now)
        if check is not None:
            self._queue_check(check)
        contacts = response.contacts.to_contacts()
        good: list[Record] = []
        wall = self._wall()
        for rec in getattr(response, "records", ()):
            # Every returned record is checked here: a relaying peer is not trusted.
            if rec.key != target or validate(rec, wall, self.config.limits) is not None:
                self._forged += 1
            elif accept is None or accept(rec):
                good.append(rec)
        if good:
            found[contact.peer_id.raw] = good
        lk.on_response(contact.peer_id, contacts, now, has_value=bool(good))

    async def store_at(self, contact: Contact, record: Record) -> bool:
        response = await self.call(
            contact, METHOD_STORE, StoreRequest(record, self._addresses), self.config.store_timeout
        )
        return response is not None and bool(response.accepted)

    async def ping(self, contact: Contact) -> bool:
        response = await self.call(
            contact, METHOD_PING, PingRequest(self._addresses), self.config.ping_timeout
        )
        return response is not None and response.responder.peer_id == contact.peer_id.raw

    # ------------------------------------------------------------ public API

    async def put(
        self, key: bytes, value: Any, ttl: float, subkey: bytes | None = None, *,
        republish: bool = True,
    ) -> int:
        """Sign and store ``value`` at the k nodes nearest ``key``; returns how many
        (this node included) accepted it. Republished before expiry until
        ``unpublish`` unless ``republish`` is false. ``ValueError`` on invalid input.

        A ``subkey`` is stored in this node's namespace: as ``own_subkey(subkey)``,
        i.e. prefixed with our raw peer id unless it already starts with it. That is
        what lets many peers announce under one key without overwriting each other;
        ``subkey=None`` is the one plain value under ``key``, shared by all peers."""
        full = self.own_subkey(subkey) if subkey is not None else None
        return await self.publisher.put(key, value, ttl, full, republish=republish)

    def unpublish(self, key: bytes, subkey: bytes | None = None) -> None:
        """Stop republishing (``subkey`` as given to ``put``); stored copies expire."""
        self.publisher.unpublish(key, self.own_subkey(subkey) if subkey is not None else None)

    def own_subkey(self, subkey: bytes) -> bytes:
        """The full sub-key ``put(..., subkey=subkey)`` stores under, as ``get`` returns it."""
        return owned_subkey(self.peer_id.raw, subkey)

    async def get(self, key: bytes) -> dict[bytes | None, Any]:
        """Live values under ``key`` by full sub-key (``None`` for the plain value).

        Each sub-key starts with the id of the peer that published it, checked by
        every node; ``records.split_subkey`` gives ``(publisher, suffix)``."""
        return (await self.publisher.get_detailed(key)).values

    async def find_peer(self, peer: PeerId) -> tuple[str, ...] | None:
        """Addresses ``peer`` can be reached at, or ``None`` if it cannot be found."""
        return await self.publisher.find_peer(peer)

    async def find_node(self, target: bytes) -> LookupResult:
        result, _ = await self.lookup(target)
        return result

    async def bootstrap(self, addresses: Sequence[str] = ()) -> int:
        """Join through ``addresses`` (and any saved contacts); returns the table size."""
        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(self._ping_address, address)
        if len(self.table) == 0:
            return 0
        await self.lookup(self.peer_id.raw)
        # Refreshing every bucket beyond our nearest neighbour's fills the far buckets
        # and makes the rest of the swarm learn about us.
        if self.config.join_refresh:
            for index in self.table.buckets_to_refresh(trio.current_time(), 0.0):
                await self.lookup(self.table.refresh_target(index, self._random32()))
        await self.publisher.publish_node_record()
        return len(self.table)

    async def add_address(self, address: str) -> None:
        """Learn the node at ``address`` (e.g. a peer that just connected to us)."""
        await self._ping_address(address)

    async def _ping_address(self, address: str) -> None:
        response = await self._call_ref(
            PeerRef(None, address), METHOD_PING, PingRequest(self._addresses),
            self.config.ping_timeout,
        )
        if response is None or response.responder.peer_id == self.peer_id.raw:
            return
        advertised = [a for a in response.responder.addresses if a != address]
        contact = Contact(PeerId(response.responder.peer_id), (address, *advertised)[:8])
        check = self.table.observe(contact, trio.current_time())
        if check is not None:
            self._queue_check(check)

    def _random32(self) -> bytes:
        return self._rng.getrandbits(256).to_bytes(32, "big")

    # ------------------------------------------------------------ background

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work until cancelled; saves the routing table on the way out."""
        self.load_routing_table()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_checks)
                task_status.started()
                while True:
                    jitter = self._rng.uniform(0.75, 1.0)
                    await trio.sleep(self.config.maintenance_interval * jitter)
                    await self.maintain_once()
        finally:
            self.save_routing_table()

    async def maintain_once(self) -> None:
        """Expire stored copies, republish our records, refresh idle buckets."""
        self.store.expire(self._wall())
        await self.publisher.republish_due()
        for index in self.table.buckets_to_refresh(
            trio.current_time(), self.config.refresh_interval
        ):
            await self.lookup(self.table.refresh_target(index, self._random32()))

    async def _run_checks(self) -> None:
        limiter = trio.CapacityLimiter(self.config.max_concurrent_pings)

        async def check_one(check: EvictionCheck) -> None:
            async with limiter:
                alive = await self.ping(check.stale)
            self.table.ping_result(check.stale.peer_id, alive, trio.current_time())

        async with trio.open_nursery() as nursery:
            async for check in self._checks_out:
                nursery.start_soon(check_one, check)

    def _routing_path(self) -> Path | None:
        return self._data_dir / self.config.routing_file if self._data_dir is not None else None

    def save_routing_table(self) -> None:
        path = self._routing_path()
        if path is not None:
            save_contacts(path, self.peer_id, self.table.contacts())

    def load_routing_table(self) -> int:
        """Add saved contacts (unverified, least trusted) to the table; returns how many."""
        path = self._routing_path()
        if path is None:
            return 0
        now = trio.current_time()
        return sum(self.table.add_unverified(c, now) for c in load_contacts(path, self.peer_id))

    def statistics(self) -> DhtStatistics:
        rt = self.table.statistics()
        return DhtStatistics(
            peer_id=self.peer_id.text, contacts=rt.contacts, nonempty_buckets=rt.nonempty_buckets,
            records_stored=len(self.store), records_published=len(self.publisher),
            lookups=self._lookups, lookup_messages=self._lookup_messages,
            rpc_calls=self._rpc_calls, rpc_failures=self._rpc_failures,
            requests_served=self.service.requests, stores_rejected=self.service.stores_rejected,
            forged_records_dropped=self._forged, evictions=rt.evictions,
        )
