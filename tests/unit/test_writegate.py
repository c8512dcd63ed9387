"""WriteGate: a receiver giving up waits for writes in progress, admits no new ones."""

from __future__ import annotations

import threading

import trio
import trio.testing

from peerd.writegate import WriteGate


async def test_close_waits_for_a_write_in_progress_on_another_thread() -> None:
    gate = WriteGate()
    entered, release = threading.Event(), threading.Event()
    closed = trio.Event()

    def writer() -> None:
        assert gate.enter()
        entered.set()
        release.wait(10)
        gate.leave()

    async def closer() -> None:
        await gate.close()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, writer)
        await trio.to_thread.run_sync(entered.wait, 10)
        nursery.start_soon(closer)
        await trio.testing.wait_all_tasks_blocked()
        assert not closed.is_set()  # the write on the thread is still going
        assert not gate.enter()  # and no new one starts meanwhile
        release.set()
        with trio.fail_after(10):
            await closed.wait()


async def test_close_without_writers_returns_at_once_and_shuts_the_gate() -> None:
    gate = WriteGate()
    assert gate.enter()
    gate.leave()
    with trio.fail_after(1):
        await gate.close()
    assert not gate.enter()
