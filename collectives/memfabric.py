"""An in-memory ``Fabric`` for tests, with fault injection.

All nodes of one ``MemNetwork`` live in one trio run. Faults are injected on
the network object and take effect at once for every node:

- ``kill(p)``: p is gone; every pending and later call, send and receive that
  involves p raises ``PeerLost([p])`` on the other side.
- ``stall(p)`` / ``resume(p)``: p's messages, in and out, are held (a
  SIGSTOPped process): calls time out, sends and receives wait.
- ``cut(a, b)`` / ``heal(a, b)``: only the link between a and b breaks.
- ``set_link(a, b, latency=..., bandwidth=...)``: one-way latency in seconds
  and bytes/second, applied to both directions (concurrent transfers do not
  share bandwidth; this models per-link speed, not contention).

Sent bytes are copied when handed over, as a real network would, so a sender
may reuse its buffer as soon as ``send_data`` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from collectives.fabric import Handler
from peerd.errors import PeerdError, PeerLost, RemoteError, Timeout


@dataclass(frozen=True)
class LinkModel:
    latency: float = 0.0  # seconds, one way
    bandwidth: float = math.inf  # bytes per second

    def transfer_time(self, nbytes: int) -> float:
        return self.latency + (nbytes / self.bandwidth if nbytes else 0.0)


class MemNetwork:
    """The shared medium: nodes, mailboxes and injected faults."""

    def __init__(self, default_link: LinkModel = LinkModel()) -> None:
        self._nodes: dict[str, MemFabric] = {}
        self._dead: set[str] = set()
        self._stalled: set[str] = set()
        self._cut: set[frozenset[str]] = set()
        self._silent: set[frozenset[str]] = set()  # see ``blackhole``
        self._links: dict[frozenset[str], LinkModel] = {}
        self._default = default_link
        self._mail: dict[tuple[str, str, bytes], bytes] = {}
        self._changed = trio.Event()
        self.bytes_sent: dict[tuple[str, str], int] = {}
        # Test hook: called as on_send(src, dst, key) when a send starts, so a
        # test can inject a fault at a precise protocol phase.
        self.on_send: Callable[[str, str, bytes], None] | None = None

    # ------------------------------------------------------------ topology

    def add(self, peer: str) -> MemFabric:
        if peer in self._nodes:
            raise ValueError(f"peer {peer!r} already on this network")
        fabric = MemFabric(self, peer)
        self._nodes[peer] = fabric
        return fabric

    def kill(self, peer: str) -> None:
        self._dead.add(peer)
        self._mail = {k: v for k, v in self._mail.items() if peer not in k[:2]}
        self._notify()

    def stall(self, peer: str) -> None:
        self._stalled.add(peer)
        self._notify()

    def resume(self, peer: str) -> None:
        self._stalled.discard(peer)
        self._notify()

    def cut(self, a: str, b: str) -> None:
        self._cut.add(frozenset((a, b)))
        self._notify()

    def blackhole(self, a: str, b: str) -> None:
        """Cut the link silently, as a cable cut without a reset: traffic
        between ``a`` and ``b`` waits (callers' timeouts end it) while each
        still lists the other among its peers, as a session does until its
        idle timeout. ``heal`` lets the waiting traffic through."""
        self._silent.add(frozenset((a, b)))
        self._notify()

    def heal(self, a: str, b: str) -> None:
        self._cut.discard(frozenset((a, b)))
        self._silent.discard(frozenset((a, b)))
        self._notify()

    def set_link(
        self, a: str, b: str, *, latency: float = 0.0, bandwidth: float = math.inf
    ) -> None:
        self._links[frozenset((a, b))] = LinkModel(latency, bandwidth)

    def link(self, a: str, b: str) -> LinkModel:
        return self._links.get(frozenset((a, b)), self._default)

    def pending_data(self, prefix: bytes = b"") -> int:
        """Number of undelivered data messages under keys starting with ``prefix``."""
        return sum(1 for k in self._mail if k[2].startswith(prefix))

    # ------------------------------------------------------------ internals

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def broken(self, a: str, b: str) -> bool:
        return a in self._dead or b in self._dead or frozenset((a, b)) in self._cut

    def _held(self, a: str, b: str) -> bool:
        return a in self._stalled or b in self._stalled or frozenset((a, b)) in self._silent

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    async def _traverse(self, src: str, dst: str, nbytes: int) -> None:
        """Spend the link's transfer time, wait out stalls, fail if broken."""
        if self.broken(src, dst):
            raise PeerLost([dst], "link down")
        delay = self.link(src, dst).transfer_time(nbytes)
        if delay > 0:
            await trio.sleep(delay)
        await self._wait_until(lambda: self.broken(src, dst) or not self._held(src, dst))
        if self.broken(src, dst):
            raise PeerLost([dst], "link down")

    async def _call(self, src: str, dst: str, method: str, payload: bytes) -> bytes:
        await self._traverse(src, dst, len(payload))
        handler = self._nodes[dst].handler(method) if dst in self._nodes else None
        if handler is None:
            raise RemoteError("ProtocolError", f"no method {method!r} on {dst}")
        reply: bytes | None = None
        error: RemoteError | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await self._wait_until(lambda: self.broken(src, dst))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                reply = bytes(await handler(src, payload))
            except PeerdError as exc:
                error = RemoteError(type(exc).__name__, str(exc))
            except Exception as exc:  # a remote bug reaches the caller as RemoteError
                error = RemoteError(type(exc).__name__, str(exc))
            nursery.cancel_scope.cancel()
        if reply is None and error is None:
            raise PeerLost([dst], "peer died during call")
        await self._traverse(dst, src, len(reply or b""))
        if error is not None:
            raise error
        assert reply is not None
        return reply


class MemFabric:
    """One node's endpoint on a ``MemNetwork``; satisfies ``Fabric``."""

    def __init__(self, network: MemNetwork, me: str) -> None:
        self._net = network
        self._me = me
        self._handlers: dict[str, Handler] = {}

    @property
    def me(self) -> str:
        return self._me

    def handler(self, method: str) -> Handler | None:
        return self._handlers.get(method)

    def register(self, method: str, handler: Handler) -> None:
        if method in self._handlers:
            raise ValueError(f"method {method!r} already registered")
        self._handlers[method] = handler

    def unregister(self, method: str) -> None:
        self._handlers.pop(method, None)

    async def call(self, peer: str, method: str, payload: bytes, timeout: float) -> bytes:
        with trio.move_on_after(timeout):
            return await self._net._call(self._me, peer, method, payload)
        raise Timeout(f"call {method} to {peer} took longer than {timeout}s")

    async def send_data(self, peer: str, key: bytes, data: memoryview | bytes) -> None:
        copy = bytes(data)
        if self._net.on_send is not None:
            self._net.on_send(self._me, peer, bytes(key))
        await self._net._traverse(self._me, peer, len(copy))
        slot = (self._me, peer, bytes(key))
        if slot in self._net._mail:
            raise ValueError(f"data already pending under key {key!r}")
        self._net._mail[slot] = copy
        link = (self._me, peer)
        self._net.bytes_sent[link] = self._net.bytes_sent.get(link, 0) + len(copy)
        self._net._notify()

    async def recv_data(self, peer: str, key: bytes) -> bytes:
        slot = (peer, self._me, bytes(key))
        net = self._net
        await net._wait_until(lambda: slot in net._mail or net.broken(self._me, peer))
        if slot in net._mail:
            return net._mail.pop(slot)
        raise PeerLost([peer], "link down")

    async def recv_data_into(self, peer: str, key: bytes, out: memoryview) -> None:
        data = await self.recv_data(peer, key)
        if len(data) != len(out):
            raise PeerLost([peer], f"sent {len(data)} bytes for a {len(out)}-byte buffer")
        out[:] = data

    def drop_data(self, prefix: bytes) -> None:
        mail = self._net._mail
        for slot in [s for s in mail if s[1] == self._me and s[2].startswith(prefix)]:
            del mail[slot]

    def abandon(self, peer: str) -> None:
        """Nothing waits to drain here: a send to a stalled peer ends when cancelled."""

    def data_received(self, peer: str) -> int:
        return self._net.bytes_sent.get((peer, self._me), 0)

    def peers(self) -> set[str]:
        return {p for p in self._net._nodes if p != self._me and not self._net.broken(self._me, p)}
