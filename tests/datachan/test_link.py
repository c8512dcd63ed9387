"""DataLink over real loopback channels: striping, routing, buffering, failure."""

from __future__ import annotations

import os
from typing import Any

import blake3
import numpy as np
import pytest
import trio
import trio.testing

from peerd import datainbox
from peerd.datachan import DataConfig
from peerd.datalink import SEND_DRAIN_TIMEOUT, DataLink, LinkConfig, open_data_link
from peerd.errors import PeerLost, ProtocolError

from .conftest import open_rig

MIB = 1024 * 1024

pytestmark = pytest.mark.usefixtures("record_loops")


@pytest.fixture(autouse=True, params=["inline", "io-threads"])
def io_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with messages moved by the event loop, and again with
    large ones moved by I/O threads (``data_threads = true``, or the Python
    record loops where cores are to spare), whatever the test's config says."""
    threads = request.param == "io-threads"
    monkeypatch.setattr(DataConfig, "offload", lambda self: threads)


async def test_mixed_sizes_any_order() -> None:
    cfg = LinkConfig(part_size=256 * 1024, min_part=16 * 1024)
    async with open_rig(DataConfig(max_record=64 * 1024)) as rig:
        a, b = await rig.pairs(4)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg) as rx:
            sizes = [0, 1, 1000, 70_000, 3 * MIB + 7]
            payloads = {f"k{n}".encode(): os.urandom(n) for n in sizes}
            for key, data in payloads.items():  # all sent before anyone asks: buffered
                await tx.send(key, data)
            for key in reversed(list(payloads)):
                assert await rx.receive(key) == payloads[key]
            assert rx.statistics().buffered_bytes == 0
            assert rx.statistics().pending_keys == 0
            # Receiver first, into a numpy buffer, and back the other way.
            out = np.empty(MIB // 4, np.float32)
            src = np.random.default_rng(1).random(MIB // 4, dtype=np.float32)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rx.receive_into, b"np", out)
                await trio.sleep(0)
                await tx.send(b"np", src)
            assert np.array_equal(out, src)
            await rx.send(b"back", b"reply")
            assert await tx.receive(b"back") == b"reply"
            per = tx.statistics().per_channel
            assert sum(1 for c in per if c.messages_sent > 0) == 4  # striped over all


async def test_one_gib_four_channels_checksummed() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(4)
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            block = np.random.default_rng(3).integers(0, 256, 64 * MIB, dtype=np.uint8)
            sent: list[bytes] = []
            got: list[bytes] = []

            async def send_all() -> None:
                for i in range(16):
                    block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
                    sent.append(blake3.blake3(block.data).digest())
                    await tx.send(b"blk%d" % i, block)

            async def receive_all() -> None:
                out = np.empty(64 * MIB, np.uint8)
                for i in range(16):
                    await rx.receive_into(b"blk%d" % i, out)
                    got.append(blake3.blake3(out.data).digest())

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all)
                    nursery.start_soon(receive_all)
            assert got == sent and len(set(sent)) == 16
            assert rx.statistics().payload_bytes_received == 1024 * MIB


async def test_backpressure_bounded_buffer() -> None:
    cfg = LinkConfig(max_buffered=2 * MIB, part_size=MIB, min_part=64 * 1024)
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg) as rx:
            data = [os.urandom(MIB + i) for i in range(6)]

            async def sender() -> None:
                for i, d in enumerate(data):
                    await tx.send(b"%d" % i, d)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                with trio.fail_after(10):
                    while rx.statistics().pending_keys < 2:
                        await trio.sleep(0.01)  # let the receiver fill its budget
                assert rx.statistics().buffered_bytes <= 2 * MIB + 1
                for i, d in enumerate(data):
                    assert await rx.receive(b"%d" % i) == d
                    assert rx.statistics().buffered_bytes <= 2 * MIB + 5


async def test_discard_drops_unclaimed_keys() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            await tx.send(b"r1/x", b"old" * 1000)
            await tx.send(b"r2/x", b"new")
            assert await rx.receive(b"r2/x") == b"new"
            assert rx.discard(b"r1/") == 1
            await tx.send(b"r1/y", b"late")  # stripes of a discarded prefix are ignored
            await tx.send(b"r3", b"next")
            assert await rx.receive(b"r3") == b"next"
            assert rx.statistics().pending_keys == 0 and rx.statistics().buffered_bytes == 0


async def test_size_mismatch_raises_protocol_error_and_link_survives() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            async with trio.open_nursery() as nursery:
                async def wrong() -> None:
                    with pytest.raises(ProtocolError):
                        await rx.receive_into(b"k", bytearray(10))
                nursery.start_soon(wrong)
                await trio.sleep(0)
                await tx.send(b"k", b"x" * 300_000)
            await tx.send(b"after", b"fine")
            assert await rx.receive(b"after") == b"fine"


async def test_peer_closing_mid_transfer_raises_peer_lost_promptly() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(4)
        rx = DataLink("dialer", b)
        tx = DataLink("listener", a)
        async with trio.open_nursery() as nursery:
            await nursery.start(rx.run)
            await nursery.start(tx.run)
            big = np.zeros(256 * MIB, np.uint8)
            first = trio.Event()

            async def killer() -> None:
                await first.wait()
                a[2].abort()  # one connection of the sender dies mid-transfer

            async def sender() -> None:
                first.set()
                with pytest.raises(PeerLost):
                    await tx.send(b"big", big)

            nursery.start_soon(killer)
            nursery.start_soon(sender)
            with trio.fail_after(5), pytest.raises(PeerLost) as info:
                await rx.receive(b"big")
            assert info.value.peers == ("dialer",)
            with pytest.raises(PeerLost):  # and every later call too
                await rx.receive(b"other")
            with pytest.raises(PeerLost):
                await tx.send(b"other", b"x")
            assert rx.statistics().failed and tx.statistics().failed


async def test_malformed_part_header_fails_link() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("d", b) as rx:
            await a[0].send(b"\x05not-a-part", b"zz")
            with trio.fail_after(5), pytest.raises(PeerLost):
                await rx.receive(b"k")


async def test_cancelled_receive_leaves_link_usable() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            out = bytearray(5 * MIB)
            with trio.move_on_after(0.05):
                await rx.receive_into(b"never", out)
            await tx.send(b"never", os.urandom(5 * MIB))  # lands in scratch, not in out
            await tx.send(b"next", b"ok")
            assert await rx.receive(b"next") == b"ok"
            assert out == bytearray(5 * MIB)


async def test_cancelled_send_skips_stripes_and_link_survives() -> None:
    cfg = LinkConfig(part_size=MIB, min_part=64 * 1024)
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg) as rx:
            big = np.ones(64 * MIB, np.uint8)
            with trio.move_on_after(0.001) as scope:
                await tx.send(b"r9/big", big)
            assert scope.cancelled_caught
            await tx.send(b"r10/next", b"after")
            assert await rx.receive(b"r10/next") == b"after"
            sent = tx.statistics().parts_sent
            assert 1 <= sent <= 64  # stripes in flight finished, at least one never left
            rx.discard(b"r9/")
            assert rx.statistics().buffered_bytes == 0
            assert not tx.statistics().failed and not rx.statistics().failed


async def test_lone_send_stripes_over_all_channels_concurrent_sends_go_whole() -> None:
    cfg = LinkConfig(part_size=MIB, min_part=64 * 1024)
    async with open_rig(DataConfig(max_record=256 * 1024)) as rig:
        a, b = await rig.pairs(4)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg) as rx:
            lone = os.urandom(MIB)
            await tx.send(b"lone", lone)
            assert await rx.receive(b"lone") == lone
            assert tx.statistics().parts_sent == 4  # idle link: one stripe per channel
            blocks = {b"c%d" % i: os.urandom(MIB) for i in range(8)}
            got: dict[bytes, bytearray] = {}

            async def fetch(key: bytes) -> None:
                got[key] = await rx.receive(key)

            async with trio.open_nursery() as nursery:
                for key, data in blocks.items():
                    nursery.start_soon(fetch, key)
                    nursery.start_soon(tx.send, key, data)
            assert got == blocks
            # Only a send that finds channels idle is cut; the others go whole.
            parts = tx.statistics().parts_sent - 4
            assert len(blocks) <= parts < 4 * len(blocks)
            assert tx.statistics().per_channel[0].records_sent > 0


async def test_discard_keeps_stripes_of_claimed_keys() -> None:
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            out = bytearray(300_000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rx.receive_into, b"round/1/x", out)
                await trio.sleep(0)
                rx.discard(b"round/1/")  # an aborted round's leftovers, not this waiter
                await tx.send(b"round/1/y", b"dropped")
                payload = os.urandom(len(out))
                await tx.send(b"round/1/x", payload)
            assert out == payload
            assert rx.statistics().pending_keys == 0


async def test_on_broken_fires_once_for_a_far_side_failure_never_for_a_local_close() -> None:
    """``on_broken`` is the transport's hint that the peer process may be gone
    (the collectives then check it at once); closing a link ourselves, which
    makes our own channels fail, must not raise that hint."""
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        broken: list[str] = []
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            tx.on_broken = rx.on_broken = broken.append
            await tx.aclose()  # our close: tx stays quiet; rx sees its peer go
            with trio.fail_after(5), pytest.raises(PeerLost):
                await rx.receive(b"never")
        assert broken == ["d"]


async def test_a_payload_that_came_early_is_copied_over_and_its_buffer_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ring's first block often arrives before its receive_into: held, copied
    over, and the held buffer serves the next early block of that size."""
    spare = datainbox.SpareBuffers()
    monkeypatch.setattr(datainbox, "SPARE", spare)
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a) as tx, open_data_link("d", b) as rx:
            for i in range(3):
                data = os.urandom(3 * MIB)
                await tx.send(b"early%d" % i, data)  # nobody asks yet: held
                with trio.fail_after(10):  # no event says a payload is held: watch the count
                    while rx.statistics().buffered_bytes < len(data):
                        await trio.sleep(0.001)
                out = bytearray(3 * MIB)
                await rx.receive_into(b"early%d" % i, out)
                assert out == data
            assert spare.hits == 2  # the first held buffer served both later blocks
            # A whole receive() hands its buffer to the caller: never kept.
            await tx.send(b"whole", b"y" * (2 * MIB))
            got = await rx.receive(b"whole")
            assert got == b"y" * (2 * MIB)
            await tx.send(b"again", b"z" * (2 * MIB))
            assert await rx.receive(b"again") == b"z" * (2 * MIB) and got == b"y" * (2 * MIB)
            assert rx.statistics().buffered_bytes == 0


def test_spare_buffers_are_bounded_and_exact() -> None:
    spare = datainbox.SpareBuffers(count=2, max_bytes=5 * MIB, min_bytes=MIB)
    small = bytearray(1000)
    spare.give(small)  # below min_bytes: not kept
    assert spare.take(1000) is not small and spare.hits == 0
    twins = [bytearray(2 * MIB), bytearray(2 * MIB)]
    for buf in twins:
        spare.give(buf)  # one of each size is kept
    assert spare.take(2 * MIB) is twins[0] and spare.hits == 1
    assert spare.take(2 * MIB) is not twins[1] and spare.hits == 1
    bufs = [bytearray(MIB), bytearray(2 * MIB), bytearray(3 * MIB)]
    for buf in bufs:
        spare.give(buf)  # the third goes over both bounds: the oldest goes
    assert spare.take(3 * MIB) is bufs[2] and spare.take(2 * MIB) is bufs[1]
    assert spare.take(MIB) is not bufs[0] and spare.hits == 3  # dropped
    spare.give(bytearray(6 * MIB))  # larger than max_bytes: not kept
    assert len(spare.take(6 * MIB)) == 6 * MIB and spare.hits == 3


async def test_a_small_message_goes_ahead_of_queued_stripes() -> None:
    """With every channel busy, a small message (a member's history, a status
    report) waits for the stripe on the wire, not behind all the stripes of
    a large transfer queued before it."""
    cfg = LinkConfig(part_size=MIB, min_part=64 * 1024)
    rx_cfg = LinkConfig(part_size=MIB, min_part=64 * 1024, max_buffered=2 * MIB)
    async with open_rig() as rig:
        a, b = await rig.pairs(1)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, rx_cfg) as rx:
            big = np.random.default_rng(5).integers(0, 256, 64 * MIB, dtype=np.uint8)
            out = np.empty_like(big)
            order: list[bytes] = []

            async def receive_big() -> None:
                await rx.receive_into(b"big", out)
                order.append(b"big")

            async def receive_small() -> None:
                assert await rx.receive(b"small") == b"status"
                order.append(b"small")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tx.send, b"big", big)
                # Unclaimed, the big one fills the receiver's buffer and then the
                # sockets: the sender blocks with most of its 64 stripes queued.
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(tx.send, b"small", b"status")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(receive_big)
                nursery.start_soon(receive_small)
            assert order == [b"small", b"big"]
            assert np.array_equal(out, big)
            assert tx.statistics().parts_sent == 65


async def test_a_channel_failing_on_a_small_message_fails_the_stripe_its_sender_held() -> None:
    """A sender takes a stripe from the queue, then sends the small message
    waiting ahead of it first; the channel fails on that one. The stripe it
    held must fail with the rest (before, its send would wait for ever)."""
    cfg = LinkConfig(part_size=MIB, min_part=64 * 1024)
    async with open_rig() as rig:
        a, b = await rig.pairs(1)
        chan, real_send = a[0], a[0].send
        first_out, gate = trio.Event(), trio.Event()

        async def send(header: bytes, view: memoryview) -> None:
            if len(view) == len(b"status"):
                raise RuntimeError("the channel broke")
            if not first_out.is_set():
                first_out.set()
                await gate.wait()  # the first stripe on the wire: the rest queue up
            await real_send(header, view)

        chan.send = send  # type: ignore[method-assign]
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg):
            big = np.zeros(4 * MIB, np.uint8)
            errors: list[BaseException] = []

            async def attempt(key: bytes, data: Any) -> None:
                try:
                    await tx.send(key, data)
                except PeerLost as exc:
                    errors.append(exc)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(attempt, b"big", big)
                    await first_out.wait()
                    nursery.start_soon(attempt, b"small", b"status")
                    await trio.testing.wait_all_tasks_blocked()
                    gate.set()
            assert len(errors) == 2
            assert tx.statistics().failed


@pytest.mark.parametrize("stripe_seconds, parts", [(1e-9, 16), (1e6, 2)])
async def test_stripes_take_about_stripe_seconds_at_the_pace_the_link_drained(
        stripe_seconds: float, parts: int) -> None:
    """Once stripes were timed, a large send is cut so that each stripe takes
    about ``stripe_seconds`` at that pace (never below ``min_stripe``): on a
    slow link a small message then waits for a short stripe on the wire, not a
    long one. On a link that drains fast enough, stripes stay whole (one per
    idle channel here)."""
    cfg = LinkConfig(part_size=MIB, min_part=16 * 1024, stripe_seconds=stripe_seconds,
                     min_stripe=64 * 1024)
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg) as rx:
            first = os.urandom(4 * MIB)
            await tx.send(b"first", first)  # not timed yet: cut by part_size
            assert tx.statistics().parts_sent == 4
            assert await rx.receive(b"first") == first
            second = os.urandom(MIB)
            await tx.send(b"second", second)
            assert tx.statistics().parts_sent - 4 == parts
            assert await rx.receive(b"second") == second


@pytest.mark.parametrize("bad", [dict(min_stripe=0), dict(min_stripe=2 * MIB, part_size=MIB),
                                 dict(stripe_seconds=0.0), dict(stripe_seconds=float("nan"))])
def test_a_link_config_that_cannot_cut_stripes_says_which_field(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        LinkConfig(**bad)


async def test_a_cancelled_send_to_a_peer_given_up_fails_the_link_at_once() -> None:
    """A peer that stopped reads nothing, so a cancelled send's stripes on the
    wire never drain; once the sender has given the peer up (``abandon``),
    the send ends at once and the link fails, instead of after
    ``SEND_DRAIN_TIMEOUT`` (which held the retry of an all-reduce 10 s)."""
    # Stripes larger than what the receiver buffers and both sockets hold
    # together: neither can end, so both are on the wire when the send is
    # cancelled, however late the threads moving them (io-threads) start. With
    # 1 MiB stripes a loaded CI host cancelled between them: nothing was left
    # to drain and the link rightly stayed up.
    cfg = LinkConfig(part_size=32 * MIB, min_part=64 * 1024)
    rx_cfg = LinkConfig(part_size=32 * MIB, min_part=64 * 1024, max_buffered=2 * MIB)
    async with open_rig() as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, rx_cfg):
            big = np.zeros(64 * MIB, np.uint8)
            sending = trio.CancelScope()

            async def send() -> None:
                with sending:
                    await tx.send(b"big", big)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                # Unclaimed, it fills the receiver's buffer and then the sockets.
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                sending.cancel()
                await trio.testing.wait_all_tasks_blocked()  # waiting for its stripes
                tx.abandon()
            assert trio.current_time() - start < SEND_DRAIN_TIMEOUT / 2
            assert tx.statistics().failed
            with pytest.raises(PeerLost, match="given up"):
                await tx.send(b"next", b"x")
