"""In-memory network for multi-node tests: latency on trio's clock, partitions, byte counts.

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` and a 60-second
scenario takes milliseconds. A partition makes calls across it fail with
``PeerLost`` after one latency (as an RPC layer would report a dead session)
and silently drops one-way messages, including those already in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from crdt.transport import Handler
from peerd.errors import PeerdError, PeerLost, RemoteError
from peerd.identity import PeerId


@dataclass(frozen=True)
class NetworkStatistics:
    calls: int
    notifies: int
    failed: int
    dropped: int
    bytes: int


class MemoryNetwork:
    def __init__(self, latency: float = 0.01) -> None:
        self.latency = latency
        self._endpoints: dict[PeerId, MemoryEndpoint] = {}
        self._group: dict[PeerId, int] = {}
        self._down: set[PeerId] = set()
        self._n = dict.fromkeys(NetworkStatistics.__dataclass_fields__, 0)

    def endpoint(self, peer: PeerId) -> MemoryEndpoint:
        if peer in self._endpoints:
            raise ValueError(f"{peer!r} is already attached")
        ep = self._endpoints[peer] = MemoryEndpoint(self, peer)
        return ep

    def partition(self, *groups: Iterable[PeerId]) -> None:
        """Split the network: peers in different groups cannot reach each other.
        Peers named in no group form one more group together."""
        self._group = {p: i + 1 for i, group in enumerate(groups) for p in group}

    def heal(self) -> None:
        self._group = {}

    def set_down(self, peer: PeerId, down: bool = True) -> None:
        """A down peer is unreachable by anyone (as if its process were frozen)."""
        if down:
            self._down.add(peer)
        else:
            self._down.discard(peer)

    def reachable(self, a: PeerId, b: PeerId) -> bool:
        if a in self._down or b in self._down or b not in self._endpoints:
            return False
        return self._group.get(a, 0) == self._group.get(b, 0)

    def statistics(self) -> NetworkStatistics:
        return NetworkStatistics(**self._n)

    async def _deliver(self, src: PeerId, dst: PeerId, method: str, payload: bytes) -> bytes:
        if not self.reachable(src, dst):
            await trio.sleep(self.latency)
            self._n["failed"] += 1
            raise PeerLost([dst.text], "unreachable in memory network")
        self._n["bytes"] += len(payload)
        await trio.sleep(self.latency)
        if not self.reachable(src, dst):
            self._n["failed"] += 1
            raise PeerLost([dst.text], "partitioned while in flight")
        handler = self._endpoints[dst].handlers.get(method)
        if handler is None:
            raise RemoteError("KeyError", f"no handler for {method!r}")
        try:
            answer = await handler(src, payload)
        except PeerdError as exc:
            # As the real RPC layer does: the remote failure comes back by name.
            raise RemoteError(type(exc).__name__, str(exc)) from None
        self._n["bytes"] += len(answer)
        await trio.sleep(self.latency)
        if not self.reachable(src, dst):
            self._n["failed"] += 1
            raise PeerLost([dst.text], "partitioned before the answer arrived")
        return answer


class MemoryEndpoint:
    """One node's view of the network; satisfies ``crdt.transport.SyncTransport``."""

    def __init__(self, network: MemoryNetwork, peer: PeerId) -> None:
        self.network = network
        self.peer = peer
        self.handlers: dict[str, Handler] = {}

    def peers(self) -> Sequence[PeerId]:
        # Like a node's session list after keepalives time out: partitioned
        # peers are still listed until the RPC fails, so gossip keeps probing them.
        return sorted(p for p in self.network._endpoints if p != self.peer)

    def register(self, method: str, handler: Handler) -> None:
        if method in self.handlers:
            raise ValueError(f"method {method!r} already registered")
        self.handlers[method] = handler

    async def call(self, peer: PeerId, method: str, payload: bytes = b"") -> bytes:
        self.network._n["calls"] += 1
        return await self.network._deliver(self.peer, peer, method, payload)

    async def notify(self, peer: PeerId, method: str, payload: bytes = b"") -> None:
        self.network._n["notifies"] += 1
        try:
            await self.network._deliver(self.peer, peer, method, payload)
        except PeerLost:
            self.network._n["dropped"] += 1
        except RemoteError:
            pass  # one-way: the sender never learns about remote failures


__all__ = ["MemoryEndpoint", "MemoryNetwork", "NetworkStatistics"]
