"""An in-memory network implementing ``RpcClient`` for many-node simulations.

Every call really encodes, crosses a simulated link (latency with jitter, each
direction may be dropped) and is decoded by the remote node's ``handle``, so
simulations exercise the same bytes as the real transport. Dead nodes and
dropped packets look exactly like the internet: the caller waits until its
timeout. Run it under ``trio.testing.MockClock(autojump_threshold=0)`` and a
simulated hour passes in the time the CPU needs for the messages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from peerd.dht.transport import Handler, PeerRef
from peerd.errors import PeerLost, ProtocolError, RemoteError, Timeout
from peerd.identity import PeerId


@dataclass(frozen=True)
class MemNetStatistics:
    nodes: int
    alive: int
    calls: int
    delivered: int
    dropped: int
    unreachable: int


class _Endpoint:
    __slots__ = ("address", "alive", "drop_rate", "handler", "peer_text")

    def __init__(self, peer_text: str, address: str) -> None:
        self.peer_text = peer_text
        self.address = address
        self.handler: Handler | None = None
        self.alive = True
        self.drop_rate = 0.0


class MemNet:
    """A set of endpoints reachable by address, with fault injection."""

    def __init__(
        self, *, latency: float = 0.02, jitter: float = 0.5, drop_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.latency = latency
        self.jitter = jitter
        self.drop_rate = drop_rate
        self._rng = rng or random.Random(0)
        self._endpoints: dict[str, _Endpoint] = {}
        self._calls = 0
        self._delivered = 0
        self._dropped = 0
        self._unreachable = 0

    def attach(self, peer: PeerId, address: str) -> MemRpc:
        if address in self._endpoints:
            raise ValueError(f"address {address} is already attached")
        endpoint = _Endpoint(peer.text, address)
        self._endpoints[address] = endpoint
        return MemRpc(self, endpoint)

    def kill(self, address: str) -> None:
        """The node stops answering and sending, like a power cut."""
        self._endpoints[address].alive = False

    def revive(self, address: str) -> None:
        self._endpoints[address].alive = True

    def set_drop_rate(self, address: str, rate: float) -> None:
        """Drop this fraction of packets to and from ``address`` (on top of the global rate)."""
        self._endpoints[address].drop_rate = rate

    def _delay(self) -> float:
        return self.latency * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))

    def _lost(self, a: _Endpoint, b: _Endpoint) -> bool:
        rate = 1.0 - (1.0 - self.drop_rate) * (1.0 - a.drop_rate) * (1.0 - b.drop_rate)
        return rate > 0.0 and self._rng.random() < rate

    async def _deliver(
        self, src: _Endpoint, peer: PeerRef, method: str, payload: bytes
    ) -> bytes:
        # The whole round trip is slept before the handler runs: one timer per call
        # instead of two halves the simulator's cost, and nothing observable depends
        # on where inside the round trip the remote handler ran.
        rtt = 2.0 * self._delay()
        if rtt > 0.0:
            await trio.sleep(rtt)
        else:
            await trio.lowlevel.checkpoint()
        dst = self._endpoints.get(peer.address)
        if dst is None or not dst.alive or dst.handler is None or not src.alive:
            self._unreachable += 1
            await trio.sleep_forever()
        assert dst is not None and dst.handler is not None  # for mypy: sleep_forever never returns
        if self._lost(src, dst):
            self._dropped += 1
            await trio.sleep_forever()
        if peer.peer_id is not None and peer.peer_id != dst.peer_text:
            # The real transport authenticates the peer id; a mismatch is a lost peer.
            raise PeerLost([peer.peer_id], f"another peer answers at {peer.address}")
        try:
            response = await dst.handler(PeerRef(src.peer_text, src.address), method, payload)
        except ProtocolError as exc:
            raise RemoteError("ProtocolError", str(exc)) from None
        if not dst.alive or self._lost(dst, src):
            self._dropped += 1
            await trio.sleep_forever()
        self._delivered += 1
        return response

    def statistics(self) -> MemNetStatistics:
        return MemNetStatistics(
            nodes=len(self._endpoints),
            alive=sum(e.alive for e in self._endpoints.values()),
            calls=self._calls, delivered=self._delivered,
            dropped=self._dropped, unreachable=self._unreachable,
        )


class MemRpc:
    """One node's view of the ``MemNet``: its ``RpcClient`` and its inbound handler."""

    def __init__(self, net: MemNet, endpoint: _Endpoint) -> None:
        self._net = net
        self._endpoint = endpoint

    @property
    def address(self) -> str:
        return self._endpoint.address

    def serve(self, handler: Handler) -> None:
        self._endpoint.handler = handler

    async def call(self, peer: PeerRef, method: str, payload: bytes, timeout: float) -> bytes:
        self._net._calls += 1
        if not self._endpoint.alive:
            raise PeerLost([self._endpoint.peer_text], "this node is down")
        with trio.move_on_after(timeout):
            return await self._net._deliver(self._endpoint, peer, method, payload)
        raise Timeout(f"{method} to {peer.address} got no answer within {timeout}s")
