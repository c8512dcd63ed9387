"""Drive a ``HolePunch`` core with trio: signalling channel, timers, dialer.

The loop owns no socket itself. A *dialer* executes ``Dial`` actions (UDP
probes in ``nat.punch_udp``, TCP simultaneous open in ``nat.punch_tcp``) and
reports each remote endpoint that answered on ``found``. The signalling
channel is anything with ``send(msg)`` / ``receive()`` (a relay circuit, an
RPC stream to a common peer).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from nat.endpoint import Endpoint
from nat.punch import (
    AttemptFailed,
    BackOff,
    Dial,
    HolePunch,
    PunchConnect,
    PunchState,
    PunchSync,
    Role,
    SendViaRelay,
    Succeeded,
)
from peerd.errors import ProtocolError


class Signal(Protocol):
    async def send(self, msg: Any) -> None: ...
    async def receive(self) -> Any: ...


Dialer = Callable[[Dial, trio.MemorySendChannel[Endpoint]], Awaitable[None]]
Listener = Callable[[trio.MemorySendChannel[Endpoint]], Awaitable[None]]


@dataclass(frozen=True)
class PunchOutcome:
    succeeded: bool
    remote: Endpoint | None
    attempt: int
    rounds: int
    rtt: float | None
    failures: tuple[str, ...]


async def drive_punch(
    punch: HolePunch,
    signal: Signal,
    dialer: Dialer,
    listener: Listener | None = None,
    *,
    max_rounds: int = 1,
    deadline: float = math.inf,
) -> PunchOutcome:
    """Run ``punch`` until it succeeds, ``max_rounds`` rounds end in backoff
    (initiator), the signalling channel closes while idle (responder), or
    ``deadline`` (trio clock) passes. ``listener``, if given, reads direct
    packets and reports their sources for the whole run."""
    events_send, events = trio.open_memory_channel[tuple[str, Any]](64)
    found_send, found = trio.open_memory_channel[Endpoint](64)
    failures: list[str] = []
    result: list[PunchOutcome] = []

    def finish(ok: bool) -> None:
        s = punch.statistics()
        result.append(PunchOutcome(ok, s.remote, s.attempt, s.rounds, s.rtt, tuple(failures)))

    async def read_signal() -> None:
        try:
            while True:
                msg = await signal.receive()
                if isinstance(msg, PunchConnect | PunchSync):
                    await events_send.send(("relay", msg))
        except (trio.EndOfChannel, trio.BrokenResourceError, ProtocolError):
            await events_send.send(("closed", None))

    async def read_found() -> None:
        async for ep in found:
            await events_send.send(("direct", ep))

    relay_open = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_signal)
        nursery.start_soon(read_found)
        if listener is not None:
            nursery.start_soon(listener, found_send.clone())
        actions = punch.start(trio.current_time()) if punch.role is Role.INITIATOR else []
        with trio.move_on_at(deadline):
            while not result:
                for act in actions:
                    if isinstance(act, SendViaRelay):
                        if relay_open:
                            await signal.send(act.message)
                    elif isinstance(act, Dial):
                        nursery.start_soon(dialer, act, found_send.clone())
                    elif isinstance(act, Succeeded):
                        finish(True)
                    elif isinstance(act, AttemptFailed):
                        failures.append(f"attempt {act.attempt}: {act.reason}")
                    elif isinstance(act, BackOff) and punch.rounds >= max_rounds:
                        finish(False)
                if result:
                    break
                if not relay_open and punch.state is PunchState.IDLE:
                    finish(False)  # nobody left to coordinate with
                    break
                wake = punch.deadline if punch.deadline is not None else math.inf
                actions = []
                with trio.move_on_at(wake) as timer:
                    kind, payload = await events.receive()
                    now = trio.current_time()
                    if kind == "relay":
                        actions = punch.receive(payload, now)
                    elif kind == "direct":
                        actions = punch.direct_packet(payload, now)
                    else:
                        relay_open = False
                if timer.cancelled_caught:
                    actions = punch.timer(trio.current_time())
        if not result:
            failures.append("deadline")
            finish(False)
        nursery.cancel_scope.cancel()
    return result[0]
