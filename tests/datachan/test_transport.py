"""SocketTransport's direct reads and writes, and lazily backed record buffers."""

from __future__ import annotations

import os

import trio
import trio.testing

from peerd.datastream import SocketTransport, lazy_buffer, recv_exactly


async def _pair() -> tuple[SocketTransport, SocketTransport]:
    a, b = trio.socket.socketpair()
    return SocketTransport(a), SocketTransport(b)


async def test_bulk_transfer_larger_than_the_socket_buffers() -> None:
    tx, rx = await _pair()
    payload = os.urandom(8 * 1024 * 1024)  # far beyond the socketpair's buffers
    got = bytearray(len(payload))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tx.send_all, payload)
        await recv_exactly(rx, memoryview(got))
    assert got == payload
    tx.close()
    rx.close()


async def test_ready_data_is_returned_without_waiting() -> None:
    tx, rx = await _pair()
    await tx.send_all(b"hello")
    buf = bytearray(16)
    n = await rx.recv_into(memoryview(buf))
    assert buf[:n] == b"hello"
    tx.close()
    assert await rx.recv_into(memoryview(buf)) == 0  # end of stream
    rx.close()


async def test_a_blocked_receive_is_cancellable(autojump_clock: trio.testing.MockClock) -> None:
    tx, rx = await _pair()
    with trio.move_on_after(5) as scope:
        await rx.recv_into(memoryview(bytearray(4)))
    assert scope.cancelled_caught
    await tx.send_all(b"late")  # nothing was consumed by the cancelled call
    buf = bytearray(4)
    await recv_exactly(rx, memoryview(buf))
    assert buf == b"late"
    tx.close()
    rx.close()


async def test_a_cancelled_caller_stops_at_its_next_call() -> None:
    tx, rx = await _pair()
    await tx.send_all(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        await rx.recv_into(memoryview(bytearray(8)))  # data is there, but we were cancelled
    assert scope.cancelled_caught
    tx.close()
    rx.close()


async def test_closing_wakes_a_blocked_receive() -> None:
    tx, rx = await _pair()
    caught: list[BaseException] = []

    async def reader() -> None:
        try:
            await rx.recv_into(memoryview(bytearray(4)))
        except (trio.ClosedResourceError, OSError) as exc:  # what the channel maps to PeerLost
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        rx.close()
    assert caught
    tx.close()


def test_lazy_buffer_is_zeroed_writable_and_sized() -> None:
    buf = lazy_buffer(3 * 1024 * 1024 + 7)
    assert len(buf) == 3 * 1024 * 1024 + 7 and not buf.readonly
    assert buf[0] == 0 and buf[-1] == 0
    buf[-4:] = b"abcd"
    assert bytes(buf[-4:]) == b"abcd"
