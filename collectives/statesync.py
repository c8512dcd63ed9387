"""Shared-state sync over a run's round view (trio driver; PCCL's bit parity).

``StateSync.of(engine).sync(state, revision, strategy)``:

1. Round boundary: ``update_view()`` admits pending joiners. A peer that is
   not a member yet joins and waits to be admitted; a joiner's first sync
   runs in the view that admitted it (the members are there already).
2. Every member sends every other its ``Announce`` (state revision,
   strategy, per-tensor piece hashes) and computes the popular state with
   the pure rule in ``collectives.state``. A status round follows, so
   survivors either all go on with the same announcements or all re-form
   the view and announce again.
3. Members whose state differs (``SEND_ONLY`` excepted) download exactly the
   differing tensors, striped over every holder (``collectives.statefetch``),
   verify each piece and write it in place. Holders serve until each
   downloader reports done or is lost, then return: running peers wait for
   the transfer, never for more.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from collectives.agree import agree, live_others, op_prefix, recv_from, send_to
from collectives.api import SyncResult, SyncStrategy
from collectives.driver import MembershipDriver
from collectives.state import Popular, Vote, needed_pieces, plan_downloads, popular
from collectives.statebuf import RawTensor, capture, describe
from collectives.statefetch import Download, Exposure, download_bytes, serve
from collectives.statemsg import Announce, TensorEntry
from collectives.view import Decision
from peerd.errors import ConfigError, Evicted, PeerLost, ProtocolError
from peerd.log import event
from peerd.wire import decode_untrusted, encode

log = logging.getLogger("collectives.statesync")

THREAD_HASH_BYTES = 32 << 20  # hash larger states on a worker thread (heartbeats go on)
_DONE = b"\x01"


@dataclass(frozen=True)
class SyncStats:
    syncs: int
    tensors_received: int
    bytes_received: int
    bytes_sent: int
    corrupt_pieces: int
    sources_dropped: int
    last_phases: tuple[tuple[str, float], ...]  # (phase, seconds) of the last sync


class StateSync:
    """Shared-state sync of one run; get it with ``StateSync.of(engine)``."""

    _by_driver: weakref.WeakKeyDictionary[MembershipDriver, StateSync] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def of(cls, driver: MembershipDriver) -> StateSync:
        if driver not in cls._by_driver:
            cls._by_driver[driver] = cls(driver)
        return cls._by_driver[driver]

    def __init__(self, driver: MembershipDriver) -> None:
        self.driver = driver
        self._lock = trio.Lock()
        self._synced = False
        self._exposure: Exposure | None = None
        self._lap = 0.0
        self._method = f"collectives/{driver.run}/state.fetch"
        self._phases: list[tuple[str, float]] = []
        self._c = dict.fromkeys(("syncs", "tensors", "received", "sent", "corrupt", "dropped"), 0)

    def statistics(self) -> SyncStats:
        c = self._c
        return SyncStats(c["syncs"], c["tensors"], c["received"], c["sent"], c["corrupt"],
                         c["dropped"], tuple(self._phases))

    async def sync(self, state: Mapping[str, Any], revision: int,
                   strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR) -> SyncResult:
        """Make this member's ``state`` bit-identical to the popular state, in place.

        Raises ``ConfigError`` when the tensors cannot take the popular state
        (other names, shapes or dtypes; read-only memory), ``Evicted`` when
        this peer is not in the view, ``PeerLost`` when every holder of the
        popular state was lost before this peer had it.
        """
        strategy = SyncStrategy(strategy)
        tensors = capture(state)
        async with self._lock:
            self._phases = []
            self._lap = trio.current_time()
            # Hashing (CPU, on a worker thread for large states) overlaps the
            # wait at the round boundary.
            announced: list[Announce] = []

            async def hash_state() -> None:
                announced.append(await _announcement(self.driver.run, revision, strategy,
                                                     tensors))
                self._phase("hash")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hash_state)
                await self._boundary()
                self._phase("boundary")
            mine = announced[0]
            self.driver.fabric.register(self._method, self._on_fetch)
            try:
                return await self._sync(mine, tensors)
            finally:
                self.driver.fabric.unregister(self._method)
                self._exposure = None

    async def _boundary(self) -> None:
        drv = self.driver
        fresh = False
        if drv.current_view() is None:
            await drv.join()
            fresh = True
        elif not self._synced and drv.view_changes == 1 and drv.view().revision > 0:
            fresh = True  # admitted by a join (node.join_run) and not synced since
        if not fresh:
            await drv.update_view()

    async def _sync(self, mine: Announce, tensors: dict[str, RawTensor]) -> SyncResult:
        drv = self.driver
        d, anns, pop = await self._agree_on_states(mine, tensors)
        self._phase("announce")
        ex = self._exposure
        assert ex is not None
        received: tuple[str, ...] = ()
        n_recv = 0
        try:
            if pop is not None and drv.me not in pop.holders:
                if mine.strategy != SyncStrategy.SEND_ONLY:
                    received, n_recv = await self._download(d, ex, anns, pop, mine, tensors)
            elif pop is not None:
                await self._serve_until_done(d, ex, anns, pop)
        finally:
            drv.fabric.drop_data(ex.key)
        self._synced = True
        self._c["syncs"] += 1
        self._c["tensors"] += len(received)
        self._c["received"] += n_recv
        self._c["sent"] += ex.sent
        self._phase("transfer")
        event(log, "collectives.state_synced", me=drv.me, revision=d.revision,
              received=n_recv, sent=ex.sent, phases=self._phases)
        return SyncResult(d.revision, d.members, received, n_recv, ex.sent)

    def _phase(self, name: str) -> None:
        now = trio.current_time()
        self._phases.append((name, round(now - self._lap, 4)))
        self._lap = now

    async def _agree_on_states(self, mine: Announce, tensors: dict[str, RawTensor]
                               ) -> tuple[Decision, dict[str, Announce], Popular | None]:
        """Announce and agree in the current view; on a lost member re-form and retry."""
        drv = self.driver
        attempt = 0
        while True:
            attempt += 1
            d = drv.core.view
            if d is None or drv.me not in d.members:
                raise Evicted(drv.me)
            try:
                anns, pop = await self._announce(d, mine, tensors)
                return d, anns, pop
            except PeerLost as exc:
                if isinstance(exc, Evicted) or attempt >= drv.config.max_attempts:
                    raise
                event(log, "collectives.state_retry", me=drv.me, revision=d.revision,
                      error=str(exc))
                await drv.reform(after=d.revision)

    async def _announce(self, d: Decision, mine: Announce, tensors: dict[str, RawTensor]
                        ) -> tuple[dict[str, Announce], Popular | None]:
        """Exchange announcements, decide, expose our state; then the status round."""
        drv = self.driver
        key = op_prefix("ss", drv.run, d, "state", 0)
        self._exposure = Exposure(key, frozenset(d.members), [tensors[n] for n in sorted(tensors)])
        payload = encode(mine)
        cfg = drv.config
        deadline = trio.current_time() + cfg.phase_timeout + len(payload) * len(d.members) / (
            cfg.min_bandwidth)
        anns: dict[str, Announce] = {drv.me: mine}
        lost = set(d.members) & drv.core.suspects

        async def put(peer: str) -> None:
            try:
                await send_to(drv, peer, key + b"an", payload, deadline)
            except PeerLost:
                lost.add(peer)

        async def get(peer: str) -> None:
            try:
                data = await recv_from(drv, peer, key + b"an", deadline, "state announce")
                msg: Announce = decode_untrusted(bytes(data), expect=Announce)
                if msg.run != drv.run:
                    raise ProtocolError(f"announcement for run {msg.run!r}")
                anns[peer] = msg
            except ProtocolError as exc:
                drv.lost({peer}, f"bad state announcement: {exc}")
                lost.add(peer)
            except PeerLost:
                lost.add(peer)

        if not lost:
            async with trio.open_nursery() as nursery:
                for peer in live_others(drv, d):
                    nursery.start_soon(put, peer)
                    nursery.start_soon(get, peer)
        pop = None
        if not lost:
            votes = {p: Vote(a.revision, a.strategy, a.digest) for p, a in anns.items()}
            pop = popular(votes, order=d.members)
            self._exposure.serving = pop is not None and drv.me in pop.holders
        await agree(drv, d, key, lost, deadline, "state sync")
        return anns, pop

    async def _download(self, d: Decision, ex: Exposure, anns: dict[str, Announce],
                        pop: Popular, mine: Announce, tensors: dict[str, RawTensor]
                        ) -> tuple[tuple[str, ...], int]:
        drv = self.driver
        winner = anns[pop.holders[0]].infos()
        ok = False
        try:
            names = plan_downloads(mine.infos(), winner)
            for name in names:
                if not tensors[name].writable:
                    raise ConfigError(f"state tensor {name!r} is read-only; it must take "
                                      "the popular state in place")
            order = sorted(winner)
            dl = Download(drv, self._method, ex.key, [winner[n] for n in order],
                          [tensors[n] for n in order], pop.holders)
            try:
                await dl.run(needed_pieces(winner, names))
            finally:
                self._c["corrupt"] += dl.corrupt
                self._c["dropped"] += len(dl.bad)
            ok = True
            return names, dl.received
        finally:
            status = _DONE if ok else b"\x00"
            for holder in pop.holders:
                if holder != drv.me and holder not in drv.core.suspects:
                    drv.spawn(_quiet_send, drv, holder, ex.key + b"done", status)

    async def _serve_until_done(self, d: Decision, ex: Exposure, anns: dict[str, Announce],
                                pop: Popular) -> None:
        """Stay in the sync (state unchanged) until every downloader is done or gone."""
        drv = self.driver
        winner = anns[pop.holders[0]].infos()
        cfg = drv.config

        async def wait(peer: str, nbytes: int) -> None:
            deadline = trio.current_time() + cfg.phase_timeout + nbytes / cfg.min_bandwidth
            with contextlib.suppress(PeerLost):
                await recv_from(drv, peer, ex.key + b"done", deadline, "state download")

        async with trio.open_nursery() as nursery:
            for peer, ann in anns.items():
                # Only peers whose bytes differ download; a peer with the same
                # bytes at another revision has nothing to fetch.
                if peer != drv.me and ann.strategy != SyncStrategy.SEND_ONLY and (
                        ann.digest != pop.digest):
                    nursery.start_soon(wait, peer, download_bytes(winner, ann.infos()))

    async def _on_fetch(self, peer: str, payload: bytes) -> bytes:
        return await serve(self.driver, self._exposure, peer, payload)


async def _announcement(run: str, revision: int, strategy: SyncStrategy,
                        tensors: dict[str, RawTensor]) -> Announce:
    def build() -> Announce:
        entries = tuple(TensorEntry.of(n, describe(tensors[n])) for n in sorted(tensors))
        return Announce(run, revision, strategy, entries)

    if sum(t.nbytes for t in tensors.values()) > THREAD_HASH_BYTES:
        return await trio.to_thread.run_sync(build)
    return build()


async def _quiet_send(drv: MembershipDriver, peer: str, key: bytes, data: bytes) -> None:
    with trio.move_on_after(drv.config.phase_timeout), contextlib.suppress(PeerLost):
        await drv.fabric.send_data(peer, key, data)
