"""What the sync driver needs from the network, and nothing more.

The node's authenticated QUIC RPC layer satisfies this protocol as it is
(``peerd.node.Node`` has ``peers``/``register``/``call``/``notify`` with these
shapes); tests use ``crdt.memnet.MemoryNetwork``. Handlers receive the
authenticated peer id of the caller. ``call`` and ``notify`` raise ``PeerLost``,
``Timeout``, ``RemoteError`` or ``ProtocolError`` on failure; the driver counts
those and carries on with other peers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from peerd.identity import PeerId

Handler = Callable[[PeerId, bytes], Awaitable[bytes]]


class SyncTransport(Protocol):
    def peers(self) -> Sequence[PeerId]:
        """Peers currently worth gossiping with (connected members)."""
        ...

    def register(self, method: str, handler: Handler) -> None:
        """Route incoming calls and one-way messages for ``method`` to ``handler``."""
        ...

    async def call(self, peer: PeerId, method: str, payload: bytes = b"") -> bytes:
        """Request/response; returns the handler's answer."""
        ...

    async def notify(self, peer: PeerId, method: str, payload: bytes = b"") -> None:
        """One-way message; the handler's answer is discarded."""
        ...


__all__ = ["Handler", "SyncTransport"]
