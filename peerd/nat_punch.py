"""Coordinated UDP hole punching on the node's QUIC socket, signalled over RPC.

Signalling goes through a rendezvous peer R that both ends are connected to:
A calls R's ``FORWARD_METHOD`` with a message for B; R calls B's
``SIGNAL_METHOD`` naming A as the source and returns B's answer. Requests are
answered synchronously, which maps ``nat.punch``'s exchange onto two round
trips: ``PunchConnect`` (answered by B's own ``PunchConnect``) and
``PunchSync`` (on which B starts its probe burst). The same channel carries
``InfoRequest`` (B answers its ``NatInfo``) and ``ReverseDial`` (B dials A).

Probes are the ``nat.probe`` packets; they share the node's UDP socket with
QUIC (first byte 0x00, routed by ``QuicEndpoint``'s raw handler) so the
mapping a probe opens is the very one the QUIC connection then uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from nat.endpoint import Endpoint
from nat.probe import TOKEN_BYTES, ProbeKind, encode_probe, parse_probe_untrusted
from nat.punch import (
    Dial,
    HolePunch,
    LocalInfo,
    PunchConfig,
    PunchConnect,
    PunchSync,
    Role,
    SendViaRelay,
)
from nat.punch_driver import PunchOutcome, drive_punch
from nat.punch_udp import BURST_OFFSETS
from peerd.errors import PeerdError, ProtocolError
from peerd.identity import PeerId
from peerd.log import event
from peerd.natstate import NatInfo
from peerd.wire import Limits, decode_untrusted, encode, message

log = logging.getLogger("peerd.punch")

FORWARD_METHOD = "peerd.nat.forward"
SIGNAL_METHOD = "peerd.nat.signal"
SIGNAL_TIMEOUT = 5.0
PUNCH_DEADLINE = 15.0
RESPONDER_TTL = 60.0
MAX_RESPONDERS = 64
_LIMITS = Limits(max_frame=8192, max_bin=4096, max_str=256, max_items=64, max_depth=4)
NODE_PUNCH_CONFIG = PunchConfig(max_attempts=2, reply_timeout=SIGNAL_TIMEOUT,
                                sync_timeout=SIGNAL_TIMEOUT, punch_timeout=2.0)

Call = Callable[[PeerId, str, bytes, float], Awaitable[bytes]]
Send = Callable[[bytes, tuple[str, int]], None]


@message(721)
@dataclass(frozen=True)
class Forward:
    """To the rendezvous: pass ``body`` to ``target`` and return its answer."""

    target: bytes
    body: bytes


@message(722)
@dataclass(frozen=True)
class Signal:
    """From the rendezvous: ``body`` comes from ``source``."""

    source: bytes
    body: bytes


@message(725)
@dataclass(frozen=True)
class InfoRequest:
    version: int


@message(726)
@dataclass(frozen=True)
class ReverseDial:
    """'Dial me at one of these': the sender is reachable, the receiver is not."""

    candidates: tuple[Endpoint, ...]


@message(727)
@dataclass(frozen=True)
class Ack:
    ok: bool


class _ViaRendezvous:
    """``nat.punch_driver.Signal`` over the rendezvous RPC: sends never block
    the punch loop (its RTT measurement relies on that)."""

    def __init__(self, coord: PunchCoordinator, rendezvous: PeerId, target: PeerId,
                 nursery: trio.Nursery) -> None:
        self._coord, self._r, self._t, self._nursery = coord, rendezvous, target, nursery
        self._send, self._recv = trio.open_memory_channel[Any](8)

    async def send(self, msg: Any) -> None:
        self._nursery.start_soon(self._exchange, msg)

    async def _exchange(self, msg: Any) -> None:
        try:
            reply = await self._coord.via(self._r, self._t, msg)
        except PeerdError:
            return  # the punch core times the attempt out
        if isinstance(reply, PunchConnect):
            await self._send.send(reply)

    async def receive(self) -> Any:
        return await self._recv.receive()


class PunchCoordinator:
    """Punch sessions of one node, both as initiator and responder."""

    def __init__(self, me: PeerId, call: Call, send_raw: Send, info: Callable[[], NatInfo],
                 reverse_dial: Callable[[PeerId, tuple[Endpoint, ...]], Awaitable[None]],
                 nursery: trio.Nursery) -> None:
        self._me = me
        self._call = call
        self._send_raw = send_raw
        self._info = info
        self._reverse_dial = reverse_dial
        self._nursery = nursery
        self._routes: dict[bytes, Callable[[Endpoint], None]] = {}
        self._responders: dict[PeerId, tuple[HolePunch, float]] = {}
        self.responded_at: dict[PeerId, float] = {}  # when a peer last punched towards us
        self.counters = {"probes_sent": 0, "probes_in": 0, "foreign_packets": 0,
                         "forwarded": 0, "punches_ok": 0, "punches_failed": 0}

    # ------------------------------------------------------------ raw packets

    def on_raw(self, data: bytes, addr: tuple[str, int]) -> None:
        probe = parse_probe_untrusted(data)
        route = self._routes.get(probe.token) if probe is not None else None
        if probe is None or route is None:
            self.counters["foreign_packets"] += 1
            return
        self.counters["probes_in"] += 1
        if probe.kind is ProbeKind.PROBE:
            self._send_raw(encode_probe(ProbeKind.ACK, probe.token), addr)
        with contextlib.suppress(ValueError):  # a source we cannot name cannot be dialled
            route(Endpoint(addr[0], addr[1]))

    async def _burst(self, action: Dial) -> None:
        packet = encode_probe(ProbeKind.PROBE, action.token)
        start = trio.current_time()
        for offset in BURST_OFFSETS:
            await trio.sleep_until(start + offset)
            for target in action.targets:
                self._send_raw(packet, target.as_tuple())
                self.counters["probes_sent"] += 1

    # ------------------------------------------------------------ signalling

    async def via(self, rendezvous: PeerId, target: PeerId, msg: Any) -> Any:
        """Send ``msg`` to ``target`` through ``rendezvous``; its decoded answer."""
        reply = await self._call(rendezvous, FORWARD_METHOD,
                                 encode(Forward(target.raw, encode(msg))), SIGNAL_TIMEOUT)
        return decode_untrusted(reply, _LIMITS)

    async def handle_forward(self, source: PeerId, payload: bytes) -> bytes:
        """Rendezvous side: pass a signal on to a peer we are connected to."""
        req = decode_untrusted(payload, _LIMITS, expect=Forward)
        target = PeerId(req.target) if len(req.target) == len(source.raw) else None
        if target is None or target in (source, self._me):
            raise ProtocolError("bad forward target")
        self.counters["forwarded"] += 1
        return await self._call(target, SIGNAL_METHOD, encode(Signal(source.raw, req.body)),
                                SIGNAL_TIMEOUT)

    async def handle_signal(self, via: PeerId, payload: bytes) -> bytes:
        """Target side: a message from ``Signal.source`` relayed by ``via``."""
        sig = decode_untrusted(payload, _LIMITS, expect=Signal)
        if len(sig.source) != len(via.raw):
            raise ProtocolError("bad signal source")
        source = PeerId(sig.source)
        msg = decode_untrusted(sig.body, _LIMITS)
        if isinstance(msg, InfoRequest):
            return encode(self._info())
        if isinstance(msg, ReverseDial):
            self._nursery.start_soon(self._reverse_dial, source, msg.candidates)
            return encode(Ack(True))
        if isinstance(msg, PunchConnect | PunchSync):
            return self._respond(source, msg)
        raise ProtocolError(f"unexpected signal {type(msg).__name__}")

    def _respond(self, source: PeerId, msg: PunchConnect | PunchSync) -> bytes:
        now = trio.current_time()
        for peer, (_, born) in list(self._responders.items()):
            if now - born > RESPONDER_TTL:
                self._drop_responder(peer)
        entry = self._responders.get(source)
        if isinstance(msg, PunchConnect) and (entry is None or entry[0].token != msg.token):
            if entry is None and len(self._responders) >= MAX_RESPONDERS:
                raise ProtocolError("too many punch sessions")
            if entry is not None:
                self._drop_responder(source)
            punch = HolePunch(Role.RESPONDER, self._local(), msg.token, NODE_PUNCH_CONFIG)
            self._responders[source] = (punch, now)

            def seen(ep: Endpoint) -> None:
                punch.direct_packet(ep, trio.current_time())

            self._routes[msg.token] = seen
            entry = self._responders[source]
            # Our ACKs may open the path before the sync arrives (when our NAT
            # still holds a mapping towards the peer), so the punch counts from here.
            self.responded_at[source] = now
        if entry is None:
            return encode(Ack(False))
        for action in entry[0].receive(msg, now):
            if isinstance(action, Dial):
                self.responded_at[source] = now
                self._nursery.start_soon(self._burst, action)
            elif isinstance(action, SendViaRelay):
                return encode(action.message)
        return encode(Ack(True))

    def _drop_responder(self, peer: PeerId) -> None:
        punch, _ = self._responders.pop(peer)
        self._routes.pop(punch.token, None)

    def _local(self) -> LocalInfo:
        info = self._info()
        return LocalInfo((*info.public, *info.private), info.nat_type, info.port_step)

    # ------------------------------------------------------------ initiating

    async def punch(self, rendezvous: PeerId, target: PeerId) -> PunchOutcome:
        """One coordinated punch with ``target``; the outcome names the remote
        endpoint that answered our probes when it worked."""
        token = os.urandom(TOKEN_BYTES)
        punch = HolePunch(Role.INITIATOR, self._local(), token, NODE_PUNCH_CONFIG)

        async def dialer(action: Dial, found: trio.MemorySendChannel[Endpoint]) -> None:
            async with found:
                await self._burst(action)

        async def listener(found: trio.MemorySendChannel[Endpoint]) -> None:
            def route(ep: Endpoint) -> None:
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    found.send_nowait(ep)

            self._routes[token] = route
            try:
                async with found:
                    await trio.sleep_forever()
            finally:
                self._routes.pop(token, None)

        async with trio.open_nursery() as nursery:
            signal = _ViaRendezvous(self, rendezvous, target, nursery)
            outcome = await drive_punch(punch, signal, dialer, listener, max_rounds=1,
                                        deadline=trio.current_time() + PUNCH_DEADLINE)
            nursery.cancel_scope.cancel()
        self.counters["punches_ok" if outcome.succeeded else "punches_failed"] += 1
        event(log, "punch.done", peer=target.short, via=rendezvous.short,
              ok=outcome.succeeded, remote=str(outcome.remote), rtt=outcome.rtt)
        return outcome
