"""``collectives.fabric.Fabric`` over a real node: QUIC RPC and TCP data links."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from collectives.fabric import Handler
from peerd.errors import PeerdError, PeerLost, ProtocolError
from peerd.identity import PeerId

if TYPE_CHECKING:  # the node builds its fabric, so only the type is needed here
    from peerd.node import Node

_PREFIX = "c."  # collective methods live in their own namespace on the node
_PURPOSE = "fabric"


@functools.lru_cache(maxsize=1024)  # every data transfer names its peer: parse once
def _peer(text: str) -> PeerId:
    try:
        return PeerId.parse(text)
    except ValueError:
        raise PeerLost([text], "not a peer id") from None


class NodeFabric:
    """One node's control and data links, as the collectives engine sees them."""

    def __init__(self, node: Node) -> None:
        self._node = node

    @property
    def me(self) -> str:
        return self._node.peer_id.text

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes:
        return await self._node.call(_peer(peer), _PREFIX + method, payload, timeout)

    def register(self, method: str, handler: Handler) -> None:
        self._node.register(_PREFIX + method, _adapt(handler))

    def unregister(self, method: str) -> None:
        self._node.unregister(_PREFIX + method)

    async def send_data(self, peer: str, key: bytes, data: memoryview | bytes) -> None:
        pid = _peer(peer)
        try:
            link = await self._node.data_out(pid, _PURPOSE)
        except PeerLost:
            raise
        except PeerdError as exc:  # no data path to the peer is, to a collective, a lost peer
            raise PeerLost([peer], f"no data link: {exc}") from None
        await link.send(key, data)

    async def recv_data(self, peer: str, key: bytes) -> memoryview | bytes:
        pid = _peer(peer)
        link = await self._node.accept_data_channels(pid, _PURPOSE)
        try:
            return memoryview(await link.receive(key))
        except RuntimeError as exc:  # the same key received twice: a peer's fault
            raise ProtocolError(str(exc)) from None

    async def recv_data_into(self, peer: str, key: bytes, out: memoryview) -> None:
        pid = _peer(peer)
        link = await self._node.accept_data_channels(pid, _PURPOSE)
        try:
            await link.receive_into(key, out)
        except RuntimeError as exc:  # the same key received twice: a peer's fault
            raise ProtocolError(str(exc)) from None
        except ProtocolError as exc:  # a payload of the wrong size
            raise PeerLost([peer], str(exc)) from None

    def drop_data(self, prefix: bytes) -> None:
        self._node.data.discard(prefix)

    def abandon(self, peer: str) -> None:
        self._node.data.abandon(_peer(peer), _PURPOSE)

    def data_received(self, peer: str) -> int:
        return self._node.data.received_from(_peer(peer), _PURPOSE)

    def peers(self) -> set[str]:
        return {p.text for p in self._node.peers()}


def _adapt(handler: Handler) -> Callable[[PeerId, bytes], Awaitable[bytes]]:
    async def on_call(peer: PeerId, payload: bytes) -> bytes:
        return await handler(peer.text, payload)

    return on_call
