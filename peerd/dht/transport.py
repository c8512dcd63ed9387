"""The abstract RPC interface the DHT driver needs from the node's transport.

The DHT is written against these two callables so that the QUIC RPC layer (or
the in-memory ``MemNet`` in simulations) can carry it unchanged:

* outbound: ``RpcClient.call(peer, method, payload, timeout) -> bytes``; it raises
  a ``PeerdError`` (``Timeout``, ``PeerLost``, ``RemoteError``, ``ProtocolError``,
  ``AuthError``) when no answer comes back;
* inbound: the transport calls ``Dht.handle(sender, method, payload) -> bytes`` for
  every method in ``peerd.dht.messages.REQUEST_TYPES``; ``sender`` is the
  authenticated peer and the address its packets came from.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from peerd.identity import PeerId


@dataclass(frozen=True)
class PeerRef:
    """Who to call: a peer id in text form and an address to reach it at.

    ``peer_id`` is ``None`` only when dialling a bootstrap address whose owner is
    not known yet; the transport then accepts whichever peer authenticates there.
    """

    peer_id: str | None
    address: str

    @classmethod
    def of(cls, peer: PeerId, address: str) -> PeerRef:
        return cls(peer_text(peer), address)


@functools.lru_cache(maxsize=65536)
def peer_text(peer: PeerId) -> str:
    """``peer.text``, cached: base32 encoding shows up in every call otherwise."""
    return peer.text


@functools.lru_cache(maxsize=65536)
def parse_peer(text: str) -> PeerId:
    """``PeerId.parse``, cached; raises ``ValueError`` like it."""
    return PeerId.parse(text)


class RpcClient(Protocol):
    async def call(self, peer: PeerRef, method: str, payload: bytes, timeout: float) -> bytes:
        """Send one request and return the response payload."""
        ...


Handler = Callable[[PeerRef, str, bytes], Awaitable[bytes]]
