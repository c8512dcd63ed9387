"""``peerd.datasock.hop``: the data path's hand-off of blocking work to a thread."""

from __future__ import annotations

import threading

import pytest
import trio

from peerd.datasock import hop


async def test_returns_what_the_function_returns_from_another_thread() -> None:
    main = threading.get_ident()
    ident, total = await hop(lambda a, b: (threading.get_ident(), a + b), 2, 3)
    assert total == 5 and ident != main


async def test_raises_what_the_function_raises() -> None:
    def boom() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        await hop(boom)


async def test_a_cancel_stops_the_function_and_waits_for_it_before_raising() -> None:
    stop = threading.Event()
    started = threading.Event()
    finished: list[bool] = []

    def blocking() -> None:
        started.set()
        if not stop.wait(timeout=30):  # the worker blocks until told to stop
            raise AssertionError("on_cancel was never called")
        finished.append(True)
        raise BrokenPipeError("stopped")  # as a socket shut down under it

    with trio.fail_after(10), trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_once_started() -> None:
                await trio.to_thread.run_sync(started.wait)
                scope.cancel()

            nursery.start_soon(cancel_once_started)
            await hop(blocking, on_cancel=stop.set)
    # Cancelled, not the worker's BrokenPipeError, and only after it returned.
    assert scope.cancelled_caught and finished == [True]


async def test_a_cancel_while_the_function_runs_wins_over_its_result() -> None:
    started, release = threading.Event(), threading.Event()
    after: list[object] = []

    def work() -> str:
        started.set()
        release.wait(timeout=30)
        return "done"

    with trio.fail_after(10), trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_then_release() -> None:
                await trio.to_thread.run_sync(started.wait)
                scope.cancel()
                release.set()  # the work completes; its caller was cancelled meanwhile

            nursery.start_soon(cancel_then_release)
            after.append(await hop(work))  # must raise Cancelled, not return
    assert scope.cancelled_caught and after == []
