"""All data channels to one peer, used as one keyed, striped message pipe.

``send(key, payload)`` cuts the payload into stripes (``peerd.dataproto.Part``)
that idle channels pick from a shared queue, so a slow connection simply carries
fewer stripes. One reader task per channel routes each arriving stripe by key:
straight into the buffer of a waiting ``receive_into``, into a fresh buffer for
a waiting ``receive``, or into a buffer held until someone asks (bounded by
``max_buffered``; beyond it the readers stop reading and TCP pushes back on the
sender). Any channel failure fails the whole link: every pending and future
call raises ``PeerLost([peer])``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio

from peerd.dataproto import (
    Part,
    PartTracker,
    choose_part_count,
    encode_part,
    parse_part,
    part_bounds,
)
from peerd.datastream import ChannelStats, DataChannel, as_bytes_view
from peerd.errors import PeerdError, PeerLost, ProtocolError
from peerd.log import event

_log = logging.getLogger("peerd.datalink")
# How long a cancelled send may wait for stripes already on the wire before it
# gives up on the link (it cannot return while a channel still reads its buffer).
SEND_DRAIN_TIMEOUT: Final = 10.0
_DISCARD_MEMORY: Final = 256


@dataclass(frozen=True)
class LinkConfig:
    part_size: int = 4 * 1024 * 1024
    min_part: int = 256 * 1024
    max_buffered: int = 1 << 30
    max_total: int = 1 << 40


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
    def __init__(self, parts: int) -> None:
        self.left = parts
        self.inflight = 0
        self.cancelled = False
        self.done = trio.Event()
        self.idle = trio.Event()

    def part_over(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()
        if self.inflight == 0:
            self.idle.set()


async def _drained(op: _SendOp) -> None:
    while op.inflight:
        if op.idle.is_set():
            op.idle = trio.Event()
        await op.idle.wait()


@dataclass(frozen=True)
class _Job:
    part: Part
    view: memoryview
    op: _SendOp


class _Assembly:
    def __init__(self) -> None:
        self.tracker: PartTracker | None = None
        self.user: memoryview | None = None  # a waiting receive_into's buffer
        self.target: memoryview | None = None  # where stripes land
        self.owned: bytearray | None = None
        self.claimed = False
        self.abandoned = False
        self.error: PeerdError | None = None
        self.counted = 0  # bytes charged to the unclaimed-buffer budget
        self.writing = 0
        self.idle = trio.Event()
        self.done = trio.Event()


class DataLink:
    """Striped keyed transfers over ``channels`` (all to ``peer``); see module doc.

    Start it with ``await nursery.start(link.run)`` or ``open_data_link``.
    Keys must be unique among messages in flight on the link.
    """

    def __init__(
        self, peer: str, channels: Sequence[DataChannel], config: LinkConfig = LinkConfig()
    ) -> None:
        if not channels:
            raise ValueError("a data link needs at least one channel")
        self.peer = peer
        self._channels = tuple(channels)
        self._cfg = config
        self._jobs_in, self._jobs_out = trio.open_memory_channel[_Job](float("inf"))
        self._asm: dict[bytes, _Assembly] = {}
        self._discarded: deque[bytes] = deque(maxlen=_DISCARD_MEMORY)
        self._buffered = 0
        self._budget = trio.Event()
        self._error: PeerLost | None = None
        self._scope: trio.CancelScope | None = None
        self._n = [0, 0, 0, 0]  # bytes sent, bytes received, parts sent, parts received

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the channels until ``aclose`` or a failure; never raises peer faults."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._error is not None:
                    nursery.cancel_scope.cancel()
                for chan in self._channels:
                    nursery.start_soon(self._guard, self._reader, chan)
                    nursery.start_soon(self._guard, self._sender, chan)
                task_status.started()
        finally:
            self._fail(PeerLost([self.peer], "data link stopped"))

    async def aclose(self) -> None:
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
        for asm in self._asm.values():
            asm.done.set()
        self._budget.set()
        self._jobs_in.close()
        while True:  # wake every send waiting for stripes nobody will send now
            try:
                job = self._jobs_out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            job.op.part_over()

    async def _guard(self, fn: Callable[[DataChannel], Awaitable[None]], chan: DataChannel) -> None:
        try:
            await fn(chan)
        except (PeerdError, ValueError, RuntimeError) as exc:
            # A peer's fault or a dead socket; ValueError/RuntimeError mean a
            # stream we can no longer trust, so the link goes down either way.
            self._fail(exc)

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
        count = choose_part_count(
            total, len(self._channels), self._cfg.part_size, self._cfg.min_part
        )
        op = _SendOp(count)
        for i in range(count):
            off, length = part_bounds(i, count, total)
            self._jobs_in.send_nowait(_Job(Part(key, i, count, off, total),
                                           view[off : off + length], op))
        try:
            await op.done.wait()
        except trio.Cancelled:
            op.cancelled = True
            with trio.CancelScope(shield=True):
                with trio.move_on_after(SEND_DRAIN_TIMEOUT):
                    await _drained(op)
                if op.inflight:
                    self._fail(PeerLost([self.peer], "cancelled send could not drain"))
                    await _drained(op)
            raise
        self._check()

    async def _sender(self, chan: DataChannel) -> None:
        async for job in self._jobs_out:
            op = job.op
            if op.cancelled or self._error is not None:
                op.part_over()
                continue
            op.inflight += 1
            try:
                await chan.send(encode_part(job.part), job.view)
            finally:
                op.inflight -= 1
                op.part_over()
            self._n[0] += len(job.view)
            self._n[2] += 1

    # ------------------------------------------------------------ receiving

    def _claim(self, key: bytes) -> _Assembly:
        self._check()
        asm = self._asm.get(key)
        if asm is None:
            asm = self._asm[key] = _Assembly()
        elif asm.claimed or asm.abandoned:
            raise RuntimeError(f"key {key!r} is already being received")
        asm.claimed = True
        self._release(asm)
        return asm

    def _release(self, asm: _Assembly) -> None:
        if asm.counted:
            self._buffered -= asm.counted
            asm.counted = 0
        self._budget.set()

    def _forget(self, key: bytes, asm: _Assembly) -> None:
        if self._asm.get(key) is asm:
            del self._asm[key]

    async def _await(self, key: bytes, asm: _Assembly) -> None:
        complete = False
        try:
            await asm.done.wait()
        except trio.Cancelled:
            # Stripes still to come go to scratch; one being decrypted into the
            # caller's buffer right now must finish before we hand it back.
            asm.abandoned = True
            with trio.CancelScope(shield=True):
                while asm.writing:
                    if asm.idle.is_set():
                        asm.idle = trio.Event()
                    await asm.idle.wait()
            if asm.tracker is not None and asm.tracker.received == asm.tracker.count:
                self._forget(key, asm)
            raise
        if asm.error is not None:
            raise asm.error  # abandoned: the reader forgets it when its last stripe lands
        self._forget(key, asm)
        complete = asm.tracker is not None and asm.tracker.received == asm.tracker.count
        if not complete:
            raise self._error or PeerLost([self.peer], "data link stopped")

    async def receive(self, key: bytes) -> bytearray:
        """The whole payload sent under ``key``, once every stripe arrived."""
        asm = self._claim(key)
        await self._await(key, asm)
        return asm.owned if asm.owned is not None else bytearray()

    async def receive_into(self, key: bytes, out: Any) -> None:
        """Like ``receive`` but lands the payload in ``out`` (any writable
        C-contiguous buffer of exactly the payload's size). Stripes that arrive
        after this call are decrypted straight into ``out``; a size mismatch
        raises ``ProtocolError``."""
        view = as_bytes_view(out)
        if view.readonly:
            raise ValueError("receive_into needs a writable buffer")
        asm = self._claim(key)
        if asm.target is None:
            asm.user = view
        await self._await(key, asm)
        if asm.owned is not None and asm.target is not view:
            if len(asm.owned) != len(view):
                raise ProtocolError(f"payload is {len(asm.owned)} bytes, buffer {len(view)}")
            view[:] = asm.owned

    def discard(self, prefix: bytes) -> int:
        """Drop unclaimed payloads whose key starts with ``prefix`` (e.g. of an
        aborted round) and ignore stripes of such keys that arrive later."""
        self._discarded.append(prefix)
        dropped = 0
        for key, asm in list(self._asm.items()):
            if key.startswith(prefix) and not asm.claimed:
                asm.abandoned = True
                self._release(asm)
                asm.owned = asm.target = None
                del self._asm[key]  # later stripes match the prefix and are ignored
                dropped += 1
        return dropped

    async def _place(self, part: Part) -> _Assembly | None:
        """The assembly a newly announced stripe belongs to, with a target."""
        if any(part.key.startswith(p) for p in self._discarded) and (
            part.key not in self._asm or not self._asm[part.key].claimed
        ):
            return None
        asm = self._asm.get(part.key)
        if asm is None:
            asm = self._asm[part.key] = _Assembly()
        if asm.tracker is None:
            asm.tracker = PartTracker(part)
        asm.tracker.begin(part)
        while asm.target is None and not asm.abandoned:
            if asm.user is not None:
                if len(asm.user) == part.total:
                    asm.target = asm.user
                    break
                asm.error = ProtocolError(
                    f"payload is {part.total} bytes, buffer {len(asm.user)}")
                asm.abandoned = True
                asm.done.set()
                break
            fits = self._buffered + part.total <= self._cfg.max_buffered
            if asm.claimed or fits:
                asm.owned = bytearray(part.total)
                asm.target = memoryview(asm.owned)
                if not asm.claimed:
                    asm.counted = part.total
                    self._buffered += part.total
                break
            if self._budget.is_set():  # wait for the next claim or release
                self._budget = trio.Event()
            await self._budget.wait()
            self._check()
        return asm

    async def _reader(self, chan: DataChannel) -> None:
        scratch = memoryview(bytearray(chan.max_record))
        while True:
            header, plen = await chan.receive_head()
            part = parse_part(header, plen, self._cfg.max_total)
            asm = await self._place(part)
            off, end = part.offset, part.offset + plen
            while off < end:
                n = await chan.next_payload_record()
                live = asm is not None and not asm.abandoned and asm.target is not None
                if live and asm is not None and asm.target is not None:
                    asm.writing += 1
                    try:
                        await chan.read_payload_into(asm.target[off : off + n])
                    finally:
                        asm.writing -= 1
                        if not asm.writing:
                            asm.idle.set()
                else:
                    await chan.read_payload_into(scratch[:n])
                off += n
            self._n[1] += plen
            self._n[3] += 1
            if asm is not None and asm.tracker is not None and asm.tracker.finish():
                asm.done.set()
                if asm.abandoned:
                    self._forget(part.key, asm)

    def statistics(self) -> LinkStats:
        return LinkStats(
            channels=len(self._channels),
            payload_bytes_sent=self._n[0],
            payload_bytes_received=self._n[1],
            parts_sent=self._n[2],
            parts_received=self._n[3],
            buffered_bytes=self._buffered,
            pending_keys=len(self._asm),
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
