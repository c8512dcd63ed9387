"""All data channels to one peer, used as one keyed, striped message pipe.

``send(key, payload)`` cuts the payload into stripes (``peerd.dataproto.Part``)
that idle channels pick from a shared queue, so a slow connection simply
carries fewer stripes; a stripe is sized to take ``LinkConfig.stripe_seconds``
at the pace the link drained lately (up to ``part_size``), and each channel's
socket holds unsent only what that pace sends in ``unsent_seconds``; a small
message (under ``min_part``) goes ahead of the stripes queued, so a status
report or a member's history never waits for a whole bulk transfer. One
reader task per channel routes each arriving stripe by key: straight into the
buffer of a waiting ``receive_into``, into a fresh buffer for a waiting
``receive``, or into a buffer held until someone asks (bounded by
``max_buffered``; beyond it the readers stop reading and TCP pushes back on
the sender). Any channel failure fails the whole link: every pending and
future call raises ``PeerLost([peer])``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio

from peerd.datainbox import Inbox
from peerd.dataproto import Part, choose_part_count, encode_part, part_bounds
from peerd.datastream import ChannelStats, DataChannel, as_bytes_view
from peerd.errors import PeerdError, PeerLost
from peerd.log import event

_log = logging.getLogger("peerd.datalink")
# How long a cancelled send may wait for stripes already on the wire before it
# gives up on the link (it cannot return while a channel still reads its buffer).
SEND_DRAIN_TIMEOUT: Final = 10.0
PACE_WINDOW: Final = 8  # stripes whose pace sets the next stripes' size


@dataclass(frozen=True)
class LinkConfig:
    part_size: int = 4 * 1024 * 1024  # the largest stripe
    min_part: int = 256 * 1024  # smaller messages go whole, ahead of queued stripes
    # A stripe is cut to take about this long on one channel at the rate the
    # link's channels last drained (never below ``min_stripe``): a small message
    # waits for the stripe on the wire ahead of it, so for about this long at
    # most per hop, however slow the link. On fast links stripes stay at
    # ``part_size``, where the cost per stripe would tell.
    stripe_seconds: float = 0.05
    min_stripe: int = 64 * 1024
    # What each channel's socket may hold unsent, at that pace: a small
    # message queues behind it on top of the stripe. Long enough that the
    # kernel's wakeup (at half of it left) finds the writer in time; on fast
    # links the channel's bound (``DataConfig.notsent_lowat``) is the smaller.
    unsent_seconds: float = 0.02
    max_buffered: int = 1 << 30
    max_total: int = 1 << 40

    def __post_init__(self) -> None:
        if not 1 <= self.min_stripe <= self.part_size:
            raise ValueError(f"min_stripe ({self.min_stripe}) must be 1..part_size "
                             f"({self.part_size}) bytes")
        for name in ("stripe_seconds", "unsent_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class LinkStats:
    channels: int
    payload_bytes_sent: int
    payload_bytes_received: int
    parts_sent: int
    parts_received: int
    buffered_bytes: int
    pending_keys: int
    failed: bool
    per_channel: tuple[ChannelStats, ...]


class _SendOp:
    def __init__(self, parts: int, on_part: Callable[[], None]) -> None:
        self.on_part = on_part  # called once per stripe as it leaves the queue for good
        self.left = parts
        self.inflight = 0
        self.cancelled = False
        self.failed = False  # some stripe was not (wholly) handed to the kernel
        self.done = trio.Event()
        self.idle = trio.Event()

    def part_over(self) -> None:
        self.on_part()
        self.left -= 1
        if self.left == 0:
            self.done.set()
        if self.inflight == 0:
            self.idle.set()


async def _drained(op: _SendOp, stop: Callable[[], bool] = lambda: False) -> None:
    """Until no stripe of ``op`` is on the wire (or ``stop()`` holds once woken)."""
    while op.inflight and not stop():
        if op.idle.is_set():
            op.idle = trio.Event()
        await op.idle.wait()


@dataclass(frozen=True)
class _Job:
    part: Part
    view: memoryview
    op: _SendOp


class DataLink:
    """Striped keyed transfers over ``channels`` (all to ``peer``); see module doc.

    Start it with ``await nursery.start(link.run)`` or ``open_data_link``.
    Keys must be unique among messages in flight on the link.
    """

    def __init__(
        self, peer: str, channels: Sequence[DataChannel], config: LinkConfig = LinkConfig(),
        on_broken: Callable[[str], None] | None = None,
    ) -> None:
        if not channels:
            raise ValueError("a data link needs at least one channel")
        self.peer = peer
        # Called once when the link breaks from the far side (a channel failed, not
        # a local close): a process killed outright resets its TCP connections at
        # once, long before anyone notices its silence.
        self.on_broken = on_broken
        self._closing = False
        self._channels = tuple(channels)
        self._cfg = config
        # Stripes in order; a ``None`` wakes a sender for a small message in
        # ``_urgent``, which every sender takes before its next stripe.
        self._jobs_in, self._jobs_out = trio.open_memory_channel[_Job | None](float("inf"))
        self._urgent: deque[_Job] = deque()
        self._error: PeerLost | None = None
        self._inbox = Inbox(peer, config.max_buffered, config.max_total, lambda: self._error)
        self._scope: trio.CancelScope | None = None
        self._n = [0, 0]  # payload bytes sent, parts sent
        # (seconds, bytes) of the last stripes sent: the pace a channel drains
        # at now is their time over their bytes (``_stripe_size``). Not the
        # fastest stripe's: one that fits in the socket's buffer goes at once
        # even on a slow link. Weighed by bytes, a stall at either end (a busy
        # core) among fast stripes hardly moves it.
        self._timed: deque[tuple[float, int]] = deque(maxlen=PACE_WINDOW)
        self._queued = 0  # stripes queued or on the wire
        self._abandoned = False  # see ``abandon``
        self._draining: set[_SendOp] = set()  # cancelled sends waiting for their stripes

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the channels until ``aclose`` or a failure; never raises peer faults."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._error is not None:
                    nursery.cancel_scope.cancel()
                for chan in self._channels:
                    nursery.start_soon(self._guard, self._inbox.reader, chan)
                    nursery.start_soon(self._guard, self._sender, chan)
                task_status.started()
        finally:
            self._fail(PeerLost([self.peer], "data link stopped"))

    async def aclose(self) -> None:
        self._closing = True  # channel errors from here on are ours, not the peer's
        if self._error is None:
            with trio.CancelScope(shield=True):
                for chan in self._channels:
                    await chan.aclose()
        self._fail(PeerLost([self.peer], "data link closed locally"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        err = exc if isinstance(exc, PeerLost) else PeerLost([self.peer], repr(exc))
        self._error = err
        event(_log, "data_link_failed", logging.INFO, peer=self.peer, error=str(err))
        for chan in self._channels:
            chan.abort()
        if self._scope is not None:
            self._scope.cancel()
        self._inbox.fail()
        self._jobs_in.close()
        while True:  # wake every send waiting for stripes nobody will send now
            try:
                job = self._urgent.popleft() if self._urgent else self._jobs_out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if job is not None:
                job.op.failed = True
                job.op.part_over()

    async def _guard(self, fn: Callable[[DataChannel], Awaitable[None]], chan: DataChannel) -> None:
        try:
            await fn(chan)
        except (PeerdError, ValueError, RuntimeError) as exc:
            self._broken(exc)

    def _broken(self, exc: Exception) -> None:
        # A peer's fault or a dead socket; ValueError/RuntimeError mean a
        # stream we can no longer trust, so the link goes down either way.
        first = self._error is None and not self._closing
        self._fail(exc)
        if first and self.on_broken is not None:
            self.on_broken(self.peer)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------ sending

    async def send(self, key: bytes, payload: Any) -> None:
        """Send ``payload`` under ``key``; returns once all of it is in the
        kernel, after which the caller may reuse the buffer."""
        self._check()
        view = as_bytes_view(payload)
        total = len(view)
        if total < self._cfg.min_part:
            if not self._queued:
                # One stripe with nothing queued: onto an idle channel from this
                # task, sparing the hand-off to a sender task and back (most of a
                # small message's cost: status reports, the ring's small blocks).
                chan = next((c for c in self._channels if not c.sending), None)
                if chan is not None:
                    await self._send_direct(chan, Part(key, 0, 1, 0, total), view)
                    return
            # With the channels busy, ahead of the queued stripes: a small
            # message (a member's history, a status report, another tag's
            # round) waits for one stripe on the wire, not for all of a large
            # transfer queued before it; on a slow link that is seconds.
            await self._queue([_Job(Part(key, 0, 1, 0, total), view, _SendOp(1, self._part_done))],
                              urgent=True)
            return
        # Stripe over the channels that are idle: a lone message uses them
        # all, while concurrent sends each go whole (up to ``part_size``) on
        # one channel, which spares records, wakeups and reassembly.
        idle = max(1, len(self._channels) - self._queued)
        count = choose_part_count(total, idle, self._stripe_size(), self._cfg.min_part)
        op = _SendOp(count, self._part_done)
        await self._queue([_Job(Part(key, i, count, off, total), view[off : off + length], op)
                           for i in range(count)
                           for off, length in [part_bounds(i, count, total)]])

    async def _queue(self, jobs: list[_Job], urgent: bool = False) -> None:
        """Queue the stripes of one send (all of one ``_SendOp``) and wait
        until each is in the kernel or given up."""
        op = jobs[0].op
        self._queued += len(jobs)
        for job in jobs:
            if urgent:
                self._urgent.append(job)
            self._jobs_in.send_nowait(None if urgent else job)
        try:
            await op.done.wait()
        except trio.Cancelled:
            op.cancelled = True
            with trio.CancelScope(shield=True):
                self._draining.add(op)
                try:
                    with trio.move_on_after(SEND_DRAIN_TIMEOUT):
                        await _drained(op, lambda: self._abandoned)
                finally:
                    self._draining.discard(op)
                if op.inflight:
                    why = "its peer was given up" if self._abandoned else "it could not drain"
                    self._fail(PeerLost([self.peer], f"a cancelled send failed the link: {why}"))
                    await _drained(op)
            raise
        if op.failed:
            raise self._error or PeerLost([self.peer], "data link stopped")
        self._abandoned = False

    async def _send_direct(self, chan: DataChannel, part: Part, view: memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing is sent yet: a clean cancel
        self._queued += 1  # concurrent sends see the channel taken
        try:
            # A message half written cannot be taken back (the channel would be
            # lost), so a cancel waits for it, as for queued stripes.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + SEND_DRAIN_TIMEOUT
                await chan.send(encode_part(part), view)
            if scope.cancelled_caught:
                raise PeerLost([self.peer], "a send could not drain")
        except (PeerdError, ValueError, RuntimeError) as exc:
            self._broken(exc)
            raise self._error or PeerLost([self.peer], "data link stopped") from None
        finally:
            self._queued -= 1
        self._abandoned = False
        self._n[0] += len(view)
        self._n[1] += 1
        # A write that did not block yielded nowhere: a caller looping over
        # small sends must not starve the heartbeats.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def abandon(self) -> None:
        """The sender has given the peer up (a collective found it gone): a
        cancelled send stops waiting for its stripes on the wire and fails the
        link at once, instead of after ``SEND_DRAIN_TIMEOUT``. A stopped peer
        (SIGSTOP, a frozen machine) reads nothing, so that wait lasted all of
        it, and held the retry of the round it was dropped from. Until the
        next send completes, a later cancelled send does the same."""
        self._abandoned = True
        for op in self._draining:
            op.idle.set()

    def _part_done(self) -> None:
        self._queued -= 1

    def _stripe_size(self) -> int:
        """The stripe to cut now: ``stripe_seconds`` at the pace stripes drained
        lately, within ``min_stripe`` and ``part_size``."""
        cfg = self._cfg
        pace = self._pace()
        if pace <= 0:
            return cfg.part_size
        return max(cfg.min_stripe, min(cfg.part_size, int(cfg.stripe_seconds / pace)))

    def _pace(self) -> float:
        """Seconds per byte the channels drained at lately; 0 before any stripe."""
        sent = sum(n for _, n in self._timed)
        return sum(t for t, _ in self._timed) / sent if sent else 0.0

    async def _sender(self, chan: DataChannel) -> None:
        async for job in self._jobs_out:
            try:
                while self._urgent:
                    await self._send_job(chan, self._urgent.popleft())
            except BaseException:
                if job is not None:  # taken from the queue: nobody else will end it
                    job.op.failed = True
                    job.op.part_over()
                raise
            if job is not None:
                await self._send_job(chan, job)

    async def _send_job(self, chan: DataChannel, job: _Job) -> None:
        op = job.op
        if op.cancelled or self._error is not None:
            op.failed = True
            op.part_over()
            return
        op.inflight += 1
        start = trio.current_time()
        try:
            await chan.send(encode_part(job.part), job.view)
        except BaseException:
            op.failed = True
            raise
        finally:
            op.inflight -= 1
            op.part_over()
        n = len(job.view)
        if n >= self._cfg.min_stripe:
            # A send returns once its bytes are in the kernel.
            self._timed.append((trio.current_time() - start, n))
            pace = self._pace()
            if pace > 0:
                chan.limit_unsent(int(self._cfg.unsent_seconds / pace))
        self._n[0] += n
        self._n[1] += 1

    # ------------------------------------------------------------ receiving

    async def receive(self, key: bytes) -> bytearray:
        """The whole payload sent under ``key``, once every stripe arrived."""
        return await self._inbox.receive(key)

    async def receive_into(self, key: bytes, out: Any) -> None:
        """Like ``receive`` but lands the payload in ``out`` (any writable
        C-contiguous buffer of exactly the payload's size). Stripes that arrive
        after this call are decrypted straight into ``out``; a size mismatch
        raises ``ProtocolError``."""
        await self._inbox.receive_into(key, out)

    def discard(self, prefix: bytes) -> int:
        """Drop unclaimed payloads whose key starts with ``prefix`` (e.g. of an
        aborted round) and ignore stripes of such keys that arrive later."""
        return self._inbox.discard(prefix)

    @property
    def bytes_received(self) -> int:
        """Payload bytes of every stripe received whole so far."""
        return self._inbox.bytes_received

    @property
    def failed(self) -> bool:
        """True once the link is down (cheaper than ``statistics().failed``)."""
        return self._error is not None

    def statistics(self) -> LinkStats:
        return LinkStats(
            channels=len(self._channels),
            payload_bytes_sent=self._n[0],
            payload_bytes_received=self._inbox.bytes_received,
            parts_sent=self._n[1],
            parts_received=self._inbox.parts_received,
            buffered_bytes=self._inbox.buffered,
            pending_keys=len(self._inbox),
            failed=self._error is not None,
            per_channel=tuple(c.statistics() for c in self._channels),
        )


@asynccontextmanager
async def open_data_link(
    peer: str, channels: Sequence[DataChannel], config: LinkConfig = LinkConfig()
) -> AsyncIterator[DataLink]:
    """A running ``DataLink`` that is closed (and its channels with it) on exit."""
    async with trio.open_nursery() as nursery:
        link = DataLink(peer, channels, config)
        await nursery.start(link.run)
        try:
            yield link
        finally:
            await link.aclose()
