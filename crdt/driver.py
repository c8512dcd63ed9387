"""Trio driver of the sync core: timers, RPC calls, and the two RPC handlers.

It owns no state of its own beyond the core: it sleeps until the core's next
wakeup (or a local write), runs the actions the core returns, feeds received
deltas to ``Store.ingest`` and counts transport failures.
"""

from __future__ import annotations

import logging
import random

import trio

from crdt.delta import Delta
from crdt.store import Store
from crdt.sync import METHOD_PUSH, METHOD_SYNC, Pull, Push, SyncConfig, SyncCore, SyncStatistics
from crdt.transport import SyncTransport
from peerd.errors import PeerLost, ProtocolError, RemoteError, Timeout
from peerd.identity import PeerId
from peerd.log import event

log = logging.getLogger("crdt.driver")

# One request/response of anti-entropy: a peer slower than this is skipped this round.
SYNC_CALL_TIMEOUT = 10.0
PUSH_TIMEOUT = 5.0

_PEER_FAULTS = (PeerLost, Timeout, RemoteError, ProtocolError, trio.TooSlowError)


class SyncDriver:
    """Replicates ``store`` over ``transport``. Construct, then ``await run()`` in a nursery."""

    def __init__(
        self,
        store: Store,
        transport: SyncTransport,
        config: SyncConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.core = SyncCore(
            store.log, store.peer_id, config or SyncConfig(), rng or random.Random()
        )
        self._wake = trio.Event()
        transport.register(METHOD_SYNC, self._serve_sync)
        transport.register(METHOD_PUSH, self._serve_push)
        store.add_write_listener(self._on_local_write)

    async def run(self) -> None:
        """Gossip forever (until cancelled)."""
        while True:
            with trio.move_on_at(self.core.next_wakeup()):
                await self._wake.wait()
            self._wake = trio.Event()
            actions = self.core.poll(trio.current_time(), self.transport.peers())
            if actions:
                async with trio.open_nursery() as nursery:
                    for action in actions:
                        if isinstance(action, Pull):
                            nursery.start_soon(self.sync_with, action.peer)
                        else:
                            nursery.start_soon(self._push, action)

    async def sync_with(self, peer: PeerId) -> bool:
        """One full anti-entropy exchange with ``peer``; False if it failed."""
        try:
            outcome = None
            for _ in range(self.core.config.max_pull_chunks):
                with trio.fail_after(SYNC_CALL_TIMEOUT):
                    reply = await self.transport.call(peer, METHOD_SYNC, self.core.make_request())
                outcome = self.core.handle_reply(reply)
                self.store.ingest(outcome.deltas)
                if not outcome.more:
                    break
            if outcome is not None:
                for payload in self.core.pushes_for(outcome.remote_vv, outcome.remote_held):
                    with trio.fail_after(PUSH_TIMEOUT):
                        await self.transport.notify(peer, METHOD_PUSH, payload)
        except _PEER_FAULTS as exc:
            self.core.transport_failed()
            event(log, "crdt.sync_failed", logging.DEBUG, peer=peer.short, error=repr(exc))
            return False
        return True

    async def _push(self, push: Push) -> None:
        try:
            with trio.fail_after(PUSH_TIMEOUT):
                await self.transport.notify(push.peer, METHOD_PUSH, push.payload)
        except _PEER_FAULTS as exc:
            self.core.transport_failed()
            event(log, "crdt.push_failed", logging.DEBUG, peer=push.peer.short, error=repr(exc))

    async def _serve_sync(self, peer: PeerId, payload: bytes) -> bytes:
        return self.core.handle_request(payload)

    async def _serve_push(self, peer: PeerId, payload: bytes) -> bytes:
        self.store.ingest(self.core.handle_push(payload))
        return b""

    def _on_local_write(self, delta: Delta) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:
            return  # written from outside this trio run: the next gossip round carries it
        self.core.local_write(now)
        self._wake.set()

    def statistics(self) -> SyncStatistics:
        return self.core.statistics()


__all__ = ["PUSH_TIMEOUT", "SYNC_CALL_TIMEOUT", "SyncDriver"]
