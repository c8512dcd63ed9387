"""Receiving from a member while watching for its loss, and the status round
that makes a collective all-or-nothing (trio helpers over a membership driver).

``recv_from`` waits for data a member sends and fails with ``PeerLost`` as
soon as the membership driver suspects that member (heartbeats, an abort
from someone else), the link breaks, or the deadline passes.

``agree`` ends every collective (the all-reduce after its ring, the p2p
collectives, state sync): every member tells every other whether it has
everything it needs, and ``fail`` is the side of a member that has not. A peer succeeds
only if no live member reports a failure, so survivors either all succeed
with the same data or all raise ``PeerLost`` (a member that vanishes after
reporting success cannot make the others disagree). Reports go to suspects
too, so a falsely suspected member hears a failure instead of succeeding
alone; what a status round cannot settle is caught by the history check of
the next call (``collectives.history``).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import NoReturn

import trio

from collectives.driver import MembershipDriver, view_digest
from collectives.view import Decision
from peerd.errors import PeerLost

OK = b"\x01"
FAILED = b"\x00"


def op_prefix(kind: str, run: str, d: Decision, tag: str, seq: int) -> bytes:
    """A short data-key prefix unique to one operation of one view (keys are
    capped at 255 bytes, run names and tags are not)."""
    text = f"{run}|{d.revision}|{view_digest(d)}|{tag}|{seq}".encode()
    return f"{kind}/{hashlib.sha256(text).hexdigest()[:24]}/".encode()


async def recv_from(
    driver: MembershipDriver, peer: str, key: bytes, deadline: float, what: str
) -> bytes | memoryview:
    """The bytes ``peer`` sent under ``key``; ``PeerLost([peer])`` if it is lost
    first, ``Evicted`` if this peer is stranded first (its view is dead).

    A broken link or a passed deadline is reported to the driver (``lost``),
    so the other members and the next view learn of it too.
    """
    result: list[bytes | memoryview] = []
    reason = ""
    with trio.move_on_at(deadline) as timer:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while peer not in driver.core.suspects and not driver.core.stranded:
                    await driver.changed().wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                result.append(await driver.fabric.recv_data(peer, key))
            except PeerLost as exc:
                reason = str(exc)
            nursery.cancel_scope.cancel()
    if result:
        return result[0]
    if driver.core.stranded:
        raise driver.evicted()
    if timer.cancelled_caught:
        reason = f"{what}: deadline passed"
    if reason:
        driver.lost({peer}, reason)
    raise PeerLost([peer], reason or f"{what}: peer lost")


async def send_to(driver: MembershipDriver, peer: str, key: bytes, data: bytes | memoryview,
                  deadline: float) -> None:
    """Send to a member; ``PeerLost([peer])`` (reported to the driver) on failure."""
    with trio.move_on_at(deadline):
        try:
            await driver.fabric.send_data(peer, key, data)
            return
        except PeerLost as exc:
            driver.lost({peer}, str(exc))
            raise PeerLost([peer], str(exc)) from None
    driver.lost({peer}, "send deadline passed")
    raise PeerLost([peer], "send deadline passed")


def live_others(driver: MembershipDriver, d: Decision) -> list[str]:
    return [p for p in d.members if p != driver.me and p not in driver.core.suspects]


async def agree(
    driver: MembershipDriver, d: Decision, prefix: bytes, lost: set[str], deadline: float,
    what: str,
) -> None:
    """Report success (``lost`` empty) or failure naming ``lost`` to every
    member of ``d``, then wait for the live members' reports. Raises
    ``PeerLost`` when this peer failed or any live member reports a failure."""
    if driver.core.stranded:
        # Its view is dead (the run went on without it): whatever arrived, this
        # peer must not claim success, nor hand out a result.
        with contextlib.suppress(PeerLost):
            fail(driver, d, prefix, {driver.me}, deadline, what)
        raise driver.evicted()
    if lost:
        fail(driver, d, prefix, lost, deadline, what)
    key = prefix + b"st"
    _tell(driver, d, key, OK, deadline)
    reports: dict[str, bytes] = {}

    async def one(peer: str) -> None:
        with contextlib.suppress(PeerLost):
            reports[peer] = bytes(await recv_from(driver, peer, key, deadline, what))

    async with trio.open_nursery() as nursery:
        for peer in d.members:
            if peer != driver.me:
                nursery.start_soon(one, peer)
    if driver.core.stranded:  # while waiting (``recv_from`` ends the waits then)
        raise driver.evicted()
    failed = {p for p, r in reports.items() if r != OK}
    if failed:
        named: set[str] = set()
        for p in failed:
            named |= set(reports[p][1:].decode("utf-8", "replace").split(","))
        named &= set(d.members) - {driver.me}
        raise PeerLost(named or failed, f"{what}: failure reported by {', '.join(sorted(failed))}")


def fail(driver: MembershipDriver, d: Decision, prefix: bytes, lost: set[str] | frozenset[str],
         deadline: float, what: str, why: str = "") -> NoReturn:
    """This peer's side of ``agree`` when it failed: report the failure naming
    ``lost`` to every member of ``d`` (sent in the background until
    ``deadline``) and raise ``PeerLost(lost)``, saying ``why`` where known."""
    _tell(driver, d, prefix + b"st", FAILED + ",".join(sorted(lost)).encode(), deadline)
    raise PeerLost(lost, f"{what} failed in revision {d.revision}" + (f": {why}" if why else ""))


def _tell(driver: MembershipDriver, d: Decision, key: bytes, status: bytes,
          deadline: float) -> None:
    # Suspects too: one that is alive after all (a false suspicion) must hear
    # a failure rather than succeed alone while the others retry without it.
    for peer in d.members:
        if peer != driver.me:
            driver.spawn(_quiet_send, driver, peer, key, status, deadline)


async def _quiet_send(
    driver: MembershipDriver, peer: str, key: bytes, data: bytes, deadline: float
) -> None:
    with trio.move_on_at(deadline), contextlib.suppress(PeerLost):
        await driver.fabric.send_data(peer, key, data)
