"""One attempt of a pipelined ring all-reduce over a ``Fabric`` (trio driver).

Each peer overlaps sending, receiving and reducing. Every block (one
sub-chunk in wire format) has its own place in one scratch buffer of the
whole tensor, and blocks are received straight into that place
(``recv_data_into``), with a few receives posted ahead so that stripes land
in place rather than in a temporary. The reduce-scatter receiver adds this
peer's fp32 input into each received partial in place (``Codec.accumulate``)
and queues it for the right neighbour (for the owned chunk: the final block,
for the all-gather); the all-gather receiver queues received final blocks
onward. Queues are unbounded in count but hold only views into the scratch
buffer, so no peer ever blocks the ring (no cyclic wait).

A block's place is written at most twice, and never while it is being sent:
the partial of chunk ``c`` arrives, is reduced and sent on; the final value
of ``c`` can only arrive after the whole ring has finished reducing it, which
includes the right neighbour having received all of our partial.

Before a peer uses any of its left neighbour's data the two compare their
last commits of the tag (``collectives.history``), so a peer that committed
a round the others retried cannot add another round's data into their sum.

Memory: the scratch buffer (the tensor's size in wire format; it becomes the
gathered result) plus nothing per block for fp32. The caller's array is read,
never written, here: ``commit`` copies the result in once the engine decided.
Scratch buffers come from ``collectives.scratch.POOL`` and go back to it once
the result is copied out or the ring has stopped: the next round of the same
size then writes memory that is already mapped (first-touch page faults cost
more than the encryption of the same bytes).

With a destination apart from the input (``out=``) whose memory is the wire
format (raw, not quantized, on the wire), the destination *is* the ring's buffer:
the partials and the final blocks land there and ``commit`` has nothing left
to do. That saves the all-or-nothing copy, a whole pass over the tensor:
4 peers sharing 2 cores spent 5-7 ms of a 67-71 ms round on it at 10M fp32
and 74-77 ms of 0.56-0.60 s at 100M. The input stays intact because the
ring only reads it; a failed attempt leaves the destination's contents
unspecified, which is why this needs a destination of its own.

With ``job.threads`` (cores to spare) the reductions of large blocks and the
final copy run on worker threads: numpy releases the GIL for them, so the
event loop keeps feeding the data channels meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import trio

from collectives.arrays import Flat
from collectives.chunking import Layout, Span
from collectives.fabric import Fabric
from collectives.history import NO_HISTORY, Diverged, diverged, odd_histories
from collectives.quant import Codec, RawCodec
from collectives.ring import all_gather_schedule, reduce_scatter_schedule
from collectives.scratch import POOL
from peerd.datasock import hop
from peerd.errors import PeerLost

# Receives posted ahead of the block being processed. A stripe that arrives
# before its receive is posted lands in a fresh buffer (page faults) and is
# copied again later: that cost ~8% of an all-reduce's CPU with 8 posted, so
# every block of a phase is posted at once up to this bound (a posted receive
# is one small task; it never blocks the ring, see the module doc).
RECEIVE_AHEAD = 256
# Blocks a sender has on the wire at once. A data link stripes a lone message
# over its idle channels; with several blocks in flight each goes whole on
# one channel, which costs fewer records and wakeups than four stripes of each
# (measured ~10% less CPU per byte), and the channels stay busy.
SEND_AHEAD = 4
# Below this many bytes a block is reduced on the event loop: a thread hop
# costs more than the addition.
THREAD_MIN = 256 * 1024
# Worker threads the final copy is split over (it is memory-bound: more do not help).
COMMIT_THREADS = 4


@dataclass
class Counters:
    sent: int = 0
    received: int = 0


@dataclass(frozen=True)
class RingJob:
    ring: tuple[str, ...]
    rank: int
    flat: Flat
    dest: Flat  # where the result goes: ``flat`` itself (in place) or an array of its own
    codec: Codec
    layout: Layout
    average: bool
    prefix: bytes  # unique per (run, view, tag, sequence number)
    reduce_deadline: float  # trio clock
    gather_deadline: float
    # By when every member has started (sent its history): the phase timeout,
    # without the data phases' allowance for the tensor's size.
    start_deadline: float
    # This peer's last commit of the tag (``collectives.history``); members
    # exchange it before one uses another's data.
    history: bytes = NO_HISTORY
    threads: bool = False  # reduce large blocks and copy the result on worker threads

    def key(self, phase: bytes, chunk: int, sub: int) -> bytes:
        return b"%s%s/%d.%d" % (self.prefix, phase, chunk, sub)

    @property
    def direct(self) -> bool:
        """True when the ring runs in the destination's own memory (see the module doc)."""
        return (self.dest is not self.flat and isinstance(self.codec, RawCodec)
                and self.codec.kind is self.flat.kind is self.dest.kind)


@dataclass(frozen=True)
class _Block:
    key: bytes
    place: memoryview  # this block's bytes in the scratch buffer
    span: Span
    step: int
    chunk: int
    sub: int


Item = tuple[bytes, memoryview | bytes]
Source = Callable[[], Awaitable[Item | None]]


def _blocks(job: RingJob, buf: memoryview, phase: bytes, chunks: Sequence[int]) -> list[_Block]:
    lay = job.layout
    return [
        _Block(job.key(phase, c, k), buf[lay.region(c, k)], span, s, c, k)
        for s, c in enumerate(chunks)
        for k, span in enumerate(lay.subs[c])
    ]


async def _receive_in_order(
    fabric: Fabric, peer: str, blocks: list[_Block], counters: Counters,
    consume: Callable[[_Block], Awaitable[None]], gate: trio.Event,
) -> None:
    """Receive ``blocks`` from ``peer`` into their places, calling ``consume``
    on each in order, none before ``gate`` is set; up to ``RECEIVE_AHEAD``
    receives are posted ahead."""
    done = [trio.Event() for _ in blocks]
    error: list[PeerLost] = []

    async with trio.open_nursery() as nursery:

        async def one(i: int) -> None:
            try:
                await fabric.recv_data_into(peer, blocks[i].key, blocks[i].place)
            except PeerLost as exc:
                error.append(exc)
                nursery.cancel_scope.cancel()
                return
            counters.received += len(blocks[i].place)
            done[i].set()

        posted = 0
        for i, block in enumerate(blocks):
            while posted < min(len(blocks), i + RECEIVE_AHEAD):
                nursery.start_soon(one, posted)
                posted += 1
            await done[i].wait()
            await gate.wait()
            await consume(block)
    if error:
        raise error[0]


async def _send_from(send: Callable[[bytes, memoryview | bytes], Awaitable[None]],
                     source: Source, width: int) -> None:
    """Send every item ``source`` yields (until it yields None), ``width`` at a time.

    A sender starts another only as it begins a send with none left waiting
    for the next item, so a phase of one block per step (small tensors; the
    event loop's whole-chunk blocks) runs two, not ``width``: each task is
    a spawn and a few scheduler steps of every round's fixed cost."""
    error: list[PeerLost] = []
    waiting = 0
    started = 1

    async with trio.open_nursery() as nursery:

        async def worker() -> None:
            nonlocal waiting, started
            try:
                while True:
                    waiting += 1
                    item = await source()
                    waiting -= 1
                    if item is None:
                        return
                    if not waiting and started < width:
                        started += 1
                        nursery.start_soon(worker)
                    await send(*item)
            except PeerLost as exc:
                error.append(exc)
                nursery.cancel_scope.cancel()

        await worker()  # the first item leaves at once, from this task
    if error:
        raise error[0]


def _drain(rx: trio.MemoryReceiveChannel[Item], first: Iterator[Item] | None = None) -> Source:
    """A source of the items of ``first`` (made lazily), then those of ``rx``."""

    async def next_item() -> Item | None:
        item = next(first, None) if first is not None else None
        if item is not None:
            return item
        try:
            return await rx.receive()
        except trio.EndOfChannel:
            return None

    return next_item


async def ring_all_reduce(fabric: Fabric, job: RingJob, counters: Counters) -> np.ndarray:
    """Run the ring; returns the gathered result in wire format (see ``job.layout``)
    as a byte array.

    Raises ``PeerLost`` naming the neighbours whose links failed, or the left
    neighbour when a phase deadline passes with its data missing.
    """
    if job.direct:
        return await _ring(fabric, job, counters, job.dest.data.view(np.uint8))
    # Unspecified contents: every byte is received or encoded before it is read.
    out = POOL.take(job.layout.total)
    try:
        return await _ring(fabric, job, counters, out)
    except BaseException:
        POOL.give(out)  # every task of the ring has ended: nothing touches it now
        raise


async def _ring(fabric: Fabric, job: RingJob, counters: Counters, out: np.ndarray) -> np.ndarray:
    size, rank, lay, codec, flat = len(job.ring), job.rank, job.layout, job.codec, job.flat
    buf = out.data
    if size == 1:
        for k, span in enumerate(lay.subs[0]):
            codec.encode(flat.fp32(span), buf[lay.region(0, k)])
        return out
    right, left = job.ring[(rank + 1) % size], job.ring[(rank - 1) % size]
    rs = reduce_scatter_schedule(rank, size)
    ag = all_gather_schedule(rank, size)
    rs_tx, rs_rx = trio.open_memory_channel[Item](math.inf)
    ag_tx, ag_rx = trio.open_memory_channel[Item](math.inf)
    ag_tx2 = ag_tx.clone()
    failed: set[str] = set()
    late: set[str] = set()  # blamed only because a deadline passed
    details: list[str] = []
    me = job.ring[rank]
    # Members' histories received in this attempt: the left neighbour's by
    # ``check_left``, every other's by ``watch_starts``.
    heard: dict[str, bytes] = {}
    others_heard = trio.Event()
    never_started = False  # a member was not heard from by the start deadline
    watching = trio.CancelScope()  # ``watch_starts``, ended with the ring's own tasks
    out_of_line: list[Diverged] = []
    checked = trio.Event()  # the left neighbour's history matches: its data may be used
    history_key = job.key(b"h", 0, 0)
    # Data received from the left neighbour once half its start window had
    # passed without its history (``judge_left``).
    left_mark: int | None = None
    judging = trio.CancelScope()  # ``judge_left``, until the left neighbour's history came

    def left_busy() -> bool:
        """Whether data kept coming from the left neighbour meanwhile."""
        return left_mark is not None and fabric.data_received(left) != left_mark

    async def tell_history(peer: str) -> None:
        with trio.move_on_at(job.reduce_deadline), suppress(PeerLost):
            await fabric.send_data(peer, history_key, job.history)

    async def judge_left() -> None:
        # The left neighbour is judged by the start deadline as every other
        # member is (see ``watch_starts``): its history leaves before its
        # data and ahead of any queued stripes (``DataLink``). Unless data
        # kept coming from it in the second half of that window (not a probe
        # at its start): its history may then be queued behind another tag's
        # stripes on a slow link, and the data deadline judges it.
        nonlocal never_started, left_mark
        with judging:
            await trio.sleep_until((trio.current_time() + job.start_deadline) / 2)
            left_mark = fabric.data_received(left)
            await trio.sleep_until(job.start_deadline)
            if not left_busy():
                never_started = True
                nursery.cancel_scope.cancel()

    async def check_left() -> None:
        try:
            heard[left] = bytes(await fabric.recv_data(left, history_key))
        finally:
            judging.cancel()  # judged: heard, or lost
        if not diverged(job.history, heard[left]):
            checked.set()
            return
        # Who is out of line is for the majority to say: hear every member.
        await others_heard.wait()
        odd = odd_histories({me: job.history, **heard})
        detail = "committed a result that the other members did not (or the reverse)"
        if me in odd:
            raise Diverged([me], f"this peer {detail}")
        raise PeerLost(odd or {left}, detail)

    async def watch_starts() -> None:
        # Every member tells its history as it starts the attempt. One not
        # heard from by the start deadline never started it (its training
        # process hung, or fell behind by more than the phase timeout): the
        # ring stops then, not at the data phases' deadlines, which add the
        # tensor's size at the minimum bandwidth (350 s for 100M fp32); the
        # others learn it from this peer's report. The left neighbour is
        # ``judge_left``'s to judge. A ring that completed does not wait on
        # it: every member started then.
        nonlocal never_started
        with watching:
            with trio.move_on_at(job.start_deadline):
                async with trio.open_nursery() as inner:
                    for peer in job.ring:
                        if peer not in (me, left):
                            inner.start_soon(_hear, fabric, peer, history_key, heard)
                others_heard.set()
                return
            never_started = True
            nursery.cancel_scope.cancel()

    async def send(key: bytes, data: memoryview | bytes) -> None:
        # Only the transfer itself has a deadline: waiting for work to forward
        # is the receivers' business, and they blame the left neighbour.
        with trio.move_on_at(job.gather_deadline):
            await fabric.send_data(right, key, data)
            counters.sent += len(data)
            return
        raise PeerLost([right], "send deadline passed")

    async def rs_sender() -> None:
        # The right neighbour hears our history before any of our data, so
        # that it can judge us by the start deadline (``judge_left``).
        await tell_history(right)
        first = rs[0].send
        # This peer's own blocks are encoded one at a time as they are sent
        # (a quantizing codec allocates each); then forward received partials.
        own = ((job.key(b"r", first, k), codec.encode_input(flat, span))
               for k, span in enumerate(lay.subs[first]))
        # The receive sides stay open to the end: a producer's send_nowait must
        # never fail because a consumer stopped first (the nursery is ending then).
        await _send_from(send, _drain(rs_rx, own), SEND_AHEAD)

    async def rs_receiver() -> None:
        last_step = size - 2
        divisor = size if job.average else 1

        async def reduce(b: _Block) -> None:
            last = b.step == last_step
            args = (b.place, flat, b.span, divisor if last else 1)
            if job.threads and len(b.place) >= THREAD_MIN:
                # Not abandoned on cancel: the scratch buffer outlives the thread.
                await hop(codec.accumulate, *args)
            else:
                codec.accumulate(*args)
            if last:
                ag_tx.send_nowait((job.key(b"g", b.chunk, b.sub), b.place))
            else:
                rs_tx.send_nowait((b.key, b.place))

        async with rs_tx, ag_tx:
            blocks = _blocks(job, buf, b"r", [step.recv for step in rs])
            await _receive_in_order(fabric, left, blocks, counters, reduce, checked)

    async def ag_receiver() -> None:
        async def forward(b: _Block) -> None:
            if b.step < size - 2:
                ag_tx2.send_nowait((b.key, b.place))

        async with ag_tx2:
            blocks = _blocks(job, buf, b"g", [step.recv for step in ag])
            await _receive_in_order(fabric, left, blocks, counters, forward, checked)

    async def ag_sender() -> None:
        await _send_from(send, _drain(ag_rx), SEND_AHEAD)

    async with trio.open_nursery() as nursery:

        def guarded(
            fn: Callable[[], Awaitable[None]], deadline: float, blame: str, phase: str
        ) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                try:
                    with trio.move_on_at(deadline) as scope:
                        await fn()
                    if scope.cancelled_caught:
                        late.add(blame)
                        details.append(f"{phase} deadline passed")
                        nursery.cancel_scope.cancel()
                except PeerLost as exc:
                    failed.update(exc.peers)
                    details.append(str(exc))
                    if isinstance(exc, Diverged):
                        out_of_line.append(exc)
                    nursery.cancel_scope.cancel()

            return run

        never = math.inf
        # Every member hears this peer's history (not counted in the bytes
        # sent, which are the tensor's) and reads every other's (``watch_starts``).
        for peer in job.ring:
            if peer not in (me, right):
                nursery.start_soon(tell_history, peer)
        nursery.start_soon(watch_starts)
        async with trio.open_nursery() as ring:
            ring.start_soon(judge_left)
            ring.start_soon(guarded(check_left, job.reduce_deadline, left, "history check"))
            ring.start_soon(guarded(rs_sender, never, right, "reduce-scatter send"))
            ring.start_soon(guarded(rs_receiver, job.reduce_deadline, left, "reduce-scatter"))
            ring.start_soon(guarded(ag_receiver, job.gather_deadline, left, "all-gather"))
            ring.start_soon(guarded(ag_sender, never, right, "all-gather send"))
        watching.cancel()
    if out_of_line:
        raise out_of_line[0]
    if late or never_started:
        # A member that never calls the all-reduce stalls the whole ring: every
        # peer's left neighbour is late. Were each to blame its own, the
        # survivors would disagree on who is gone and agree on no view among
        # them; every one names the members it never heard from instead.
        absent = {p for p in job.ring if p != me and p not in heard}
        if never_started and left_busy():
            absent.discard(left)  # busy sending: judged by the data deadline (``judge_left``)
        if absent:
            late = absent
            details.append(f"{', '.join(sorted(absent))} never started this all-reduce")
        failed |= late
    if failed:
        raise PeerLost(failed, "; ".join(details))
    return out


async def _hear(fabric: Fabric, peer: str, key: bytes, heard: dict[str, bytes]) -> None:
    with suppress(PeerLost):
        heard[peer] = bytes(await fabric.recv_data(peer, key))


async def commit(job: RingJob, gathered: np.ndarray) -> None:
    """Write the gathered result into the destination, all or nothing (a
    cancel waits for the copy to end); ``gathered`` goes back to the scratch
    pool. Nothing to do when the ring ran in the destination (``job.direct``)."""
    if job.direct:
        return
    buf = gathered.data
    blocks = [(buf[job.layout.region(c, k)], span)
              for c, pieces in enumerate(job.layout.subs) for k, span in enumerate(pieces)]

    def copy(part: Sequence[tuple[memoryview, Span]]) -> None:
        for place, span in part:
            job.codec.decode_into(place, job.dest, span)

    if job.threads and job.layout.total >= COMMIT_THREADS * THREAD_MIN:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for i in range(COMMIT_THREADS):
                    nursery.start_soon(hop, copy, blocks[i::COMMIT_THREADS])
    else:
        copy(blocks)
    del blocks
    buf.release()
    POOL.give(gathered)
