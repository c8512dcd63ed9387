"""Receive side of a ``DataLink``: routing arriving stripes to their payloads.

Each key has an assembly: where its stripes land (a waiting ``receive_into``'s
buffer, a fresh buffer for a waiting ``receive``, or a held buffer charged to
the ``max_buffered`` budget until someone asks), which stripes have begun
(``PartTracker`` refuses duplicates), and whether its waiter gave up (then the
remaining stripes are decrypted into scratch and dropped).

A payload that arrives before its ``receive_into`` lands in a held buffer and
is copied over when asked for. A ring's first block often does: its sender
started a few milliseconds sooner. A fresh buffer of that size costs more
than the copy (a 10 MB ``bytearray`` took 4-5 ms to zero and fault in, the
copy 0.3), so once copied the buffer is kept (``SPARE``) for the next early
payload of the same size, as the next round's first block will be.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final

import trio

from peerd.dataproto import Part, PartTracker, parse_part
from peerd.datastream import DataChannel, as_bytes_view, lazy_buffer
from peerd.errors import PeerdError, PeerLost, ProtocolError
from peerd.writegate import WriteGate

_DISCARD_MEMORY: Final = 256


class SpareBuffers:
    """Held-payload buffers kept for reuse, by exact size: one of each size,
    at most ``count`` and ``max_bytes`` in all, the least recently kept going
    first. Below ``min_bytes`` a buffer is cheap to make and is not kept.
    (One per size: a ring has one early block a round, and every buffer kept
    is memory the process holds between rounds.)"""

    def __init__(self, count: int = 4, max_bytes: int = 64 << 20,
                 min_bytes: int = 1 << 20) -> None:
        self._count = count
        self._max_bytes = max_bytes
        self._min_bytes = min_bytes
        self._free: OrderedDict[int, bytearray] = OrderedDict()  # by size, oldest first
        self._lock = threading.Lock()  # nodes of one process may run on several threads
        self.hits = 0

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes; a kept one holds an earlier payload's bytes."""
        with self._lock:
            buf = self._free.pop(size, None)
            if buf is not None:
                self.hits += 1
                return buf
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """Keep ``buf`` for a later ``take``; nothing else may use it any more."""
        size = len(buf)
        if size < self._min_bytes or size > self._max_bytes:
            return
        with self._lock:
            if size in self._free:
                return
            self._free[size] = buf
            # The keys are the sizes: a handful of them, summed as they stand.
            while len(self._free) > self._count or sum(self._free) > self._max_bytes:
                self._free.popitem(last=False)


SPARE: Final = SpareBuffers()


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
        self.gate = WriteGate()  # readers' writes into ``target``, closed on abandon
        self.done = trio.Event()


class Inbox:
    """All assemblies of one link. ``error()`` is the link's failure, if any."""

    def __init__(self, peer: str, max_buffered: int, max_total: int,
                 error: Callable[[], PeerLost | None]) -> None:
        self.peer = peer
        self._max_buffered = max_buffered
        self._max_total = max_total
        self._error = error
        self._asm: dict[bytes, _Assembly] = {}
        self._discarded: deque[bytes] = deque(maxlen=_DISCARD_MEMORY)
        self._discarded_all: tuple[bytes, ...] = ()  # the same, for one startswith call
        self.buffered = 0
        self._budget = trio.Event()
        self.bytes_received = 0
        self.parts_received = 0

    def __len__(self) -> int:
        return len(self._asm)

    def _check(self) -> None:
        err = self._error()
        if err is not None:
            raise err

    def fail(self) -> None:
        """Wake every waiter: the link is down."""
        for asm in self._asm.values():
            asm.done.set()
        self._budget.set()

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
            self.buffered -= asm.counted
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
            await asm.gate.close()
            if asm.tracker is not None and asm.tracker.received == asm.tracker.count:
                self._forget(key, asm)
            raise
        if asm.error is not None:
            raise asm.error  # abandoned: the reader forgets it when its last stripe lands
        self._forget(key, asm)
        complete = asm.tracker is not None and asm.tracker.received == asm.tracker.count
        if not complete:
            raise self._error() or PeerLost([self.peer], "data link stopped")

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
            held, asm.owned, asm.target = asm.owned, None, None
            if len(held) != len(view):
                raise ProtocolError(f"payload is {len(held)} bytes, buffer {len(view)}")
            view[:] = held
            # Complete, and its assembly forgotten: no stripe writes into it again.
            SPARE.give(held)

    def discard(self, prefix: bytes) -> int:
        """Drop unclaimed payloads whose key starts with ``prefix`` (e.g. of an
        aborted round) and ignore stripes of such keys that arrive later."""
        self._discarded.append(prefix)
        self._discarded_all = tuple(self._discarded)
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
        asm = self._asm.get(part.key)
        # A claimed key is wanted whatever was discarded (checked first: the
        # scan over up to _DISCARD_MEMORY prefixes is paid per stripe otherwise).
        if (asm is None or not asm.claimed) and part.key.startswith(self._discarded_all):
            return None
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
            fits = self.buffered + part.total <= self._max_buffered
            if asm.claimed or fits:
                asm.owned = SPARE.take(part.total)
                asm.target = memoryview(asm.owned)
                if not asm.claimed:
                    asm.counted = part.total
                    self.buffered += part.total
                break
            if self._budget.is_set():  # wait for the next claim or release
                self._budget = trio.Event()
            await self._budget.wait()
            self._check()
        return asm

    async def reader(self, chan: DataChannel) -> None:
        """Route every stripe arriving on ``chan`` until it fails."""
        scratch = lazy_buffer(chan.max_record)  # for dropped stripes only: rarely touched
        while True:
            header, plen = await chan.receive_head()
            part = parse_part(header, plen, self._max_total)
            asm = await self._place(part)
            if asm is not None and asm.target is not None and not asm.abandoned:
                dest = asm.target[part.offset : part.offset + plen]
                await chan.receive_payload(dest, asm.gate, scratch)
            else:
                await chan.receive_payload(None, None, scratch)
            self.bytes_received += plen
            self.parts_received += 1
            if asm is not None and asm.tracker is not None and asm.tracker.finish():
                asm.done.set()
                if asm.abandoned:
                    self._forget(part.key, asm)
            # Socket reads yield only when they block: give the receivers (and
            # everything else) a turn after each stripe.
            await trio.lowlevel.checkpoint()

