"""Answering DHT requests from the routing table and the record store (sans-I/O).

The driver decodes a request, hands it here with the authenticated sender and
the current times, and sends back the response. Every request also tells the
routing table the sender is alive; when that needs a ping-before-evict check,
the check is returned for the driver to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peerd.dht.messages import (
    MAX_RECORDS_PER_RESPONSE,
    ContactList,
    FindNodeRequest,
    FindNodeResponse,
    FindValueRequest,
    FindValueResponse,
    PingRequest,
    PingResponse,
    StoreRequest,
    StoreResponse,
    WireContact,
)
from peerd.dht.routing import Contact, EvictionCheck, RoutingTable
from peerd.dht.storage import RecordStore
from peerd.errors import ProtocolError
from peerd.identity import PeerId


@dataclass(frozen=True)
class Handled:
    response: Any
    check: EvictionCheck | None


class DhtService:
    """Server half of the DHT for one node."""

    def __init__(self, me: Contact, table: RoutingTable, store: RecordStore, k: int) -> None:
        self.me = me
        self.table = table
        self.store = store
        self.k = k
        self.requests = 0
        self.stores_rejected = 0

    def handle(
        self, sender: PeerId, sender_address: str, request: Any, now: float, wall: float
    ) -> Handled:
        """Answer ``request`` from ``sender``; raises ``ProtocolError`` for unknown types."""
        self.requests += 1
        addresses = getattr(request, "addresses", ())
        contact = Contact(sender, tuple(addresses) if addresses else (sender_address,))
        check = self.table.observe(contact, now)
        if isinstance(request, PingRequest):
            return Handled(PingResponse(WireContact.of(self.me)), check)
        if isinstance(request, FindNodeRequest):
            return Handled(FindNodeResponse(self._closest(request.target, sender)), check)
        if isinstance(request, FindValueRequest):
            records = self.store.get(request.key, wall, limit=MAX_RECORDS_PER_RESPONSE)
            return Handled(
                FindValueResponse(tuple(records), self._closest(request.key, sender)), check
            )
        if isinstance(request, StoreRequest):
            reason = self.store.store(request.record, wall)
            if reason is not None:
                self.stores_rejected += 1
                return Handled(StoreResponse(False, reason.value), check)
            return Handled(StoreResponse(True, ""), check)
        raise ProtocolError(f"unexpected DHT request {type(request).__name__}")

    def _closest(self, target: bytes, sender: PeerId) -> ContactList:
        # The asker already knows itself; leaving it out makes room for one more useful peer.
        found = self.table.closest(target, self.k + 1)
        return ContactList.of([c for c in found if c.peer_id != sender][: self.k])
