"""The DHT's RPC interface over a node's authenticated QUIC sessions.

Outbound calls reuse a live session to the peer or dial its address first
(checking the peer id when one is known); inbound DHT requests are handed to
``Dht.handle`` with the address the peer's packets come from, which is its
listening socket since a node sends and receives QUIC on one UDP socket.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from peerd.config import format_address
from peerd.dht.messages import REQUEST_TYPES
from peerd.dht.node import Dht
from peerd.dht.transport import PeerRef, parse_peer
from peerd.errors import PeerLost
from peerd.identity import PeerId

if TYPE_CHECKING:  # the node builds this adapter
    from peerd.node import Node


def dht_key(name: bytes | str) -> bytes:
    """The 32-byte DHT key of a user-facing name (``peerd dht put NAME ...``)."""
    raw = name.encode() if isinstance(name, str) else name
    return hashlib.sha256(b"peerd-dht-name\0" + raw).digest()


class NodeRpc:
    """``peerd.dht.transport.RpcClient`` over a ``Node``."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def call(self, peer: PeerRef, method: str, payload: bytes, timeout: float) -> bytes:
        expect: PeerId | None = None
        if peer.peer_id is not None:
            try:
                expect = parse_peer(peer.peer_id)
            except ValueError:
                raise PeerLost([peer.peer_id], "malformed peer id") from None
            if expect == self._node.peer_id:
                raise PeerLost([peer.peer_id], "that is this node")
        if expect is None:
            expect = self._node.peer_at(peer.address)
        if expect is None or expect not in self._node.peers():
            expect = await self._node.connect(peer.address, expect=expect)
        return await self._node.call(expect, method, payload, timeout)


def serve_dht(node: Node, dht: Dht) -> None:
    """Route the DHT's request methods on ``node`` to ``dht``."""

    def make(method: str):  # type: ignore[no-untyped-def]
        async def handler(peer: PeerId, payload: bytes) -> bytes:
            addr = format_address(node.session(peer).conn.addr)
            return await dht.handle(PeerRef.of(peer, addr), method, payload)

        return handler

    for method in REQUEST_TYPES:
        node.register(method, make(method))
