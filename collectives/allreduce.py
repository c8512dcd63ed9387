"""One attempt of a pipelined ring all-reduce over a ``Fabric`` (trio driver).

Four tasks per peer overlap sending, receiving and reducing: the
reduce-scatter receiver decodes each incoming sub-chunk, adds this peer's fp32
input in place and queues the re-encoded partial (or, for the owned chunk, the
final block) for the matching sender; the all-gather receiver stores final
blocks and queues them onward. Queues are unbounded in count but hold only
views into one buffer, so no peer ever blocks the ring (no cyclic wait).

Memory: one buffer of the whole tensor in wire format (the gathered result,
also used to stage forwarded partials, which pass each peer once) plus
sub-chunk temporaries. The caller's array is read, never written, here.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import trio

from collectives.arrays import Flat
from collectives.chunking import Layout
from collectives.fabric import Fabric
from collectives.quant import Codec
from collectives.ring import all_gather_schedule, reduce_scatter_schedule
from peerd.errors import PeerLost


@dataclass
class Counters:
    sent: int = 0
    received: int = 0


@dataclass(frozen=True)
class RingJob:
    ring: tuple[str, ...]
    rank: int
    flat: Flat
    codec: Codec
    layout: Layout
    average: bool
    prefix: bytes  # unique per (run, view, tag, sequence number)
    reduce_deadline: float  # trio clock
    gather_deadline: float

    def key(self, phase: bytes, chunk: int, sub: int) -> bytes:
        return b"%s%s/%d.%d" % (self.prefix, phase, chunk, sub)


Item = tuple[bytes, memoryview]


async def ring_all_reduce(fabric: Fabric, job: RingJob, counters: Counters) -> bytearray:
    """Run the ring; returns the gathered result in wire format (see ``job.layout``).

    Raises ``PeerLost`` naming the neighbours whose links failed, or the left
    neighbour when a phase deadline passes with its data missing.
    """
    size, rank, lay, codec, flat = len(job.ring), job.rank, job.layout, job.codec, job.flat
    out = bytearray(lay.total)
    buf = memoryview(out)
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
    details: list[str] = []

    async def send(key: bytes, data: memoryview | bytes) -> None:
        # Only the transfer itself has a deadline: waiting for work to forward
        # is the receivers' business, and they blame the left neighbour.
        with trio.move_on_at(job.gather_deadline):
            await fabric.send_data(right, key, data)
            counters.sent += len(data)
            return
        raise PeerLost([right], "send deadline passed")

    async def recv(key: bytes, expect: int) -> bytes | memoryview:
        data = await fabric.recv_data(left, key)
        counters.received += len(data)
        if len(data) != expect:
            raise PeerLost([left], f"sent {len(data)} bytes for a {expect}-byte block")
        return data

    async def rs_sender() -> None:
        first = rs[0].send
        for k, span in enumerate(lay.subs[first]):
            await send(job.key(b"r", first, k), codec.encode_input(flat, span))
        # The receive sides stay open to the end: a producer's send_nowait must
        # never fail because a consumer stopped first (the nursery is ending then).
        async for key, data in rs_rx:
            await send(key, data)

    async def rs_receiver() -> None:
        async with rs_tx, ag_tx:
            for s, step in enumerate(rs):
                c, last = step.recv, s == size - 2
                for k, span in enumerate(lay.subs[c]):
                    region = buf[lay.region(c, k)]
                    acc = codec.decode(await recv(job.key(b"r", c, k), len(region)), span.size)
                    np.add(acc, flat.fp32(span), out=acc)
                    if last and job.average:
                        np.divide(acc, np.float32(size), out=acc)
                    codec.encode(acc, region)
                    if last:
                        ag_tx.send_nowait((job.key(b"g", c, k), region))
                    else:
                        rs_tx.send_nowait((job.key(b"r", c, k), region))

    async def ag_receiver() -> None:
        async with ag_tx2:
            for s, step in enumerate(ag):
                c = step.recv
                for k in range(len(lay.subs[c])):
                    region = buf[lay.region(c, k)]
                    key = job.key(b"g", c, k)
                    region[:] = await recv(key, len(region))
                    if s < size - 2:
                        ag_tx2.send_nowait((key, region))

    async def ag_sender() -> None:
        async for key, data in ag_rx:
            await send(key, data)

    async with trio.open_nursery() as nursery:

        def guarded(
            fn: Callable[[], Awaitable[None]], deadline: float, blame: str, phase: str
        ) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                try:
                    with trio.move_on_at(deadline) as scope:
                        await fn()
                    if scope.cancelled_caught:
                        raise PeerLost([blame], f"{phase} deadline passed")
                except PeerLost as exc:
                    failed.update(exc.peers)
                    details.append(str(exc))
                    nursery.cancel_scope.cancel()

            return run

        never = math.inf
        nursery.start_soon(guarded(rs_sender, never, right, "reduce-scatter send"))
        nursery.start_soon(guarded(rs_receiver, job.reduce_deadline, left, "reduce-scatter"))
        nursery.start_soon(guarded(ag_receiver, job.gather_deadline, left, "all-gather"))
        nursery.start_soon(guarded(ag_sender, never, right, "all-gather send"))
    if failed:
        raise PeerLost(failed, "; ".join(details))
    return out


def commit(job: RingJob, gathered: bytearray) -> None:
    """Write the gathered result into the caller's array (no awaits: all or nothing)."""
    buf = memoryview(gathered)
    for c, pieces in enumerate(job.layout.subs):
        for k, span in enumerate(pieces):
            job.codec.decode_into(buf[job.layout.region(c, k)], job.flat, span)
