"""The network contract the collectives engine programs against.

A ``Fabric`` is one node's view of the swarm: small control RPCs (msgpack
payloads, QUIC underneath) and bulk byte transfers keyed by an opaque ``key``
(several encrypted TCP connections underneath). The real implementation lives
in the node; ``collectives.memfabric`` is an in-memory one with fault
injection for tests. Nothing here does I/O.

Contract every implementation keeps:

- ``call`` runs ``handler(me, payload)`` registered under ``method`` on
  ``peer`` and returns its bytes. It raises ``PeerLost([peer])`` when the peer
  or the link is gone, ``Timeout`` when ``timeout`` seconds pass, and
  ``RemoteError`` when the remote handler raised (or has no such method).
- ``send_data`` returns once the bytes are handed to the network; the caller
  may reuse ``data`` afterwards. Bytes sent under one ``key`` to one peer are
  delivered whole, once, to the matching ``recv_data(me, key)`` on that peer,
  whichever of the two calls comes first. Raises ``PeerLost([peer])``.
- ``recv_data`` waits for the bytes ``peer`` sent under ``key`` and raises
  ``PeerLost([peer])`` as soon as that peer or the link to it is gone.
- ``recv_data_into`` is ``recv_data`` landing the bytes in ``out`` (a
  writable buffer of exactly their size; the real fabric decrypts straight
  into it). A payload of another size raises ``PeerLost([peer])``: the peer
  broke the protocol. If cancelled, ``out`` may hold part of the payload.
- ``abandon`` says this node has given ``peer`` up: a send to it that was
  cancelled stops waiting for bytes already on the wire (the real fabric
  fails its link to the peer instead; a stopped peer reads none of them).
- ``drop_data`` forgets buffered bytes whose key starts with ``prefix`` (an
  aborted collective leaves bytes nobody will receive).
- ``peers`` is the set of peers currently connected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

Handler = Callable[[str, bytes], Awaitable[bytes]]
"""A control handler: ``(caller peer id, request payload) -> reply payload``."""


@runtime_checkable
class Fabric(Protocol):
    """One node's control and data links to the other peers."""

    @property
    def me(self) -> str:
        """This node's peer id (text form)."""
        ...

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes: ...

    def register(self, method: str, handler: Handler) -> None: ...

    def unregister(self, method: str) -> None: ...

    async def send_data(self, peer: str, key: bytes, data: memoryview | bytes) -> None: ...

    async def recv_data(self, peer: str, key: bytes) -> memoryview | bytes: ...

    async def recv_data_into(self, peer: str, key: bytes, out: memoryview) -> None: ...

    def drop_data(self, prefix: bytes) -> None: ...

    def abandon(self, peer: str) -> None: ...

    def data_received(self, peer: str) -> int:
        """Payload bytes received from ``peer`` so far, under any key: a sign
        that its data link carries something, even when what a collective
        waits for is queued behind it."""
        ...

    def peers(self) -> set[str]: ...
