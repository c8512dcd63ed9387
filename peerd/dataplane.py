"""The node's data plane: a TCP listener and encrypted links per peer.

A node sends bulk bytes to a peer on its *outbound* link (opened lazily:
ask the peer for single-use tokens over the authenticated session, then dial
N TCP connections) and receives on the *inbound* link that the peer opened.
Splitting by direction means neither side has to win a race to open the one
shared link; ``open_data_channels`` also gives a caller a link usable both
ways (the peer sees it as its inbound link).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from peerd.datachan import DataConfig, DataListener, dial_data_channel
from peerd.datalink import DataLink, LinkStats
from peerd.dataproto import TokenTable
from peerd.datastream import DataChannel
from peerd.errors import AuthError, PeerdError, PeerLost, ProtocolError, Timeout
from peerd.identity import PeerId
from peerd.log import event
from peerd.nat_data import (
    DataPunchReply,
    DataPunchRequest,
    QuicChannelInbox,
    bind_reserved,
    open_quic_channels,
    punch_all,
)
from peerd.quic import QuicStream
from peerd.session import Session
from peerd.wire import decode_untrusted, encode, message

log = logging.getLogger("peerd.dataplane")

OpenLink = Callable[[], Awaitable[DataLink]]
Call = Callable[[Session, str, bytes], Awaitable[bytes]]
LinkKey = tuple[PeerId, str]  # (peer, purpose): the fabric's links and users' are apart

TOKEN_TTL = 30.0
MAX_CHANNELS = 64
DATA_OPEN_METHOD = "peerd.data.open"
DATA_REVERSE_METHOD = "peerd.data.reverse"
DATA_PUNCH_METHOD = "peerd.data.punch"
# How a link to a peer is opened, chosen by the node's traversal layer from the
# session's path: dial its listener (then reverse), only ask it to dial us, a
# TCP simultaneous open, or channels over QUIC streams. Every route ends with
# the QUIC-stream fallback, which works on any live session (relayed too).
ROUTES = ("direct", "reverse", "punch", "quic")
# A first dial that gets no answer this fast is taken as filtered (a NAT or
# firewall dropping unsolicited SYNs): the peer is then asked to dial us.
DIRECT_DIAL_TIMEOUT = 3.0


@message(30)
@dataclass(frozen=True)
class DataOpenRequest:
    channels: int
    purpose: str


@message(31)
@dataclass(frozen=True)
class DataOpenReply:
    port: int
    tokens: tuple[bytes, ...]


@message(32)
@dataclass(frozen=True)
class DataReverseRequest:
    """'Dial me': our listener could not be reached the other way."""

    port: int
    tokens: tuple[bytes, ...]
    purpose: str


@dataclass
class _Inbound:
    expected: int
    channels: list[DataChannel]
    done: trio.Event | None = None


class DataPlane:
    """Owns the listener, the token table and every data link of a node."""

    def __init__(self, me: PeerId, nursery: trio.Nursery, host: str, call: Call,
                 config: DataConfig | None = None) -> None:
        self._me = me
        self._call = call
        self._reverse_wait: dict[PeerId, _Inbound] = {}
        self._nursery = nursery
        self._tokens = TokenTable()
        self._config = config or DataConfig()
        self._listener = DataListener(self._tokens, self._on_channel, host=host,
                                      config=self._config)
        self._host = host
        self._out: dict[LinkKey, DataLink] = {}
        self._out_locks: dict[LinkKey, trio.Lock] = {}
        self._in: dict[LinkKey, DataLink] = {}
        # Channels arrive tagged only with their peer, so a peer has at most one
        # link being opened towards us at a time (its outbound lock ensures it).
        self._in_pending: dict[PeerId, tuple[str, _Inbound]] = {}
        self._in_changed = trio.Event()
        self._quic_inbox = QuicChannelInbox(self._install_inbound, self._config)
        self.routes_used: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self.port = 0
        self.on_broken: Callable[[str], None] | None = None  # see DataLink.on_broken

    async def start(self, port: int) -> int:
        """Listen on ``port`` (the QUIC port, so one number names both); fall
        back to any free port when it is taken."""
        try:
            self._listener = DataListener(self._tokens, self._on_channel, host=self._host,
                                          port=port, config=self._config)
            self.port = await self._nursery.start(self._listener.serve)
        except OSError:
            self._listener = DataListener(self._tokens, self._on_channel, host=self._host,
                                          config=self._config)
            self.port = await self._nursery.start(self._listener.serve)
        return self.port

    # ------------------------------------------------------------ serving side

    async def handle_open(self, session: Session, payload: bytes) -> bytes:
        req = decode_untrusted(payload, expect=DataOpenRequest)
        if not 1 <= req.channels <= MAX_CHANNELS or len(req.purpose) > 64:
            raise ProtocolError(f"data link of {req.channels} channels refused")
        now = trio.current_time()
        tokens = tuple(self._tokens.issue(session.peer.text, session.keying, TOKEN_TTL, now)
                       for _ in range(req.channels))
        self._in_pending[session.peer] = (req.purpose, _Inbound(req.channels, []))
        return encode(DataOpenReply(self.port, tokens))

    async def handle_reverse(self, session: Session, payload: bytes) -> bytes:
        """The peer could not reach our listener: dial its listener instead,
        and use those connections as our inbound link from it."""
        req = decode_untrusted(payload, expect=DataReverseRequest)
        if not 1 <= len(req.tokens) <= MAX_CHANNELS or len(req.purpose) > 64 \
                or not 0 < req.port < 65536:
            raise ProtocolError("bad reverse data-link request")
        self._in_pending.pop(session.peer, None)
        chans = await self._dial_all(session, req.port, req.tokens, probe=False)
        self._install_inbound(session.peer, req.purpose, chans)
        return b""

    async def handle_punch(self, session: Session, payload: bytes) -> bytes:
        """The peer opens a link by TCP simultaneous open: bind ports, answer
        with them, and connect to its ports while it connects to ours."""
        req = decode_untrusted(payload, expect=DataPunchRequest)
        n = len(req.tokens)
        if not 1 <= n <= MAX_CHANNELS or len(req.ports) != n or len(req.purpose) > 64 \
                or not all(0 < p < 65536 for p in req.ports):
            raise ProtocolError("bad data punch request")
        socks, ports = await bind_reserved(self._host, n)

        async def connect() -> None:
            try:
                chans = await punch_all(socks, self._host, session.conn.addr[0], req.ports,
                                        req.tokens, session, False, self._config)
            except PeerdError as exc:
                event(log, "data.punch_failed", peer=session.peer.short, error=exc)
                return
            self._install_inbound(session.peer, req.purpose, chans)

        self._nursery.start_soon(connect)
        return encode(DataPunchReply(tuple(ports)))

    async def take_quic_stream(self, stream: QuicStream, session: Session) -> None:
        """A data channel the peer opened over a QUIC stream of ``session``."""
        try:
            await self._quic_inbox.take(stream, session)
        except (PeerdError, trio.TooSlowError) as exc:
            event(log, "data.quic_channel_refused", logging.DEBUG, peer=session.peer.short,
                  error=exc)
            stream.reset()

    def _on_channel(self, peer_text: str, channel: DataChannel) -> None:
        peer = PeerId.parse(peer_text)
        waiter = self._reverse_wait.get(peer)
        if waiter is not None:
            waiter.channels.append(channel)
            if len(waiter.channels) >= waiter.expected and waiter.done is not None:
                waiter.done.set()
            return
        entry = self._in_pending.get(peer)
        if entry is None:
            self._nursery.start_soon(channel.aclose)
            return
        purpose, pending = entry
        pending.channels.append(channel)
        if len(pending.channels) < pending.expected:
            return
        del self._in_pending[peer]
        self._install_inbound(peer, purpose, pending.channels)

    def _install_inbound(self, peer: PeerId, purpose: str, chans: list[DataChannel]) -> None:
        link = DataLink(peer.text, chans, on_broken=self.on_broken)
        old = self._in.get((peer, purpose))
        self._in[(peer, purpose)] = link
        self._nursery.start_soon(link.run)
        if old is not None:
            self._nursery.start_soon(old.aclose)
        self._in_changed.set()
        self._in_changed = trio.Event()
        event(log, "data.inbound_link", peer=peer.short, channels=len(link._channels))

    # ------------------------------------------------------------ dialling side

    async def open_link(self, session: Session, channels: int, purpose: str,
                        route: str = "direct") -> DataLink:
        """Open ``channels`` encrypted connections to the peer and run them as
        one link, by ``route`` (see ``ROUTES``), falling back to QUIC streams."""
        chans: list[DataChannel] | None = None
        if route in ("direct", "reverse", "punch"):
            try:
                if route == "punch":
                    chans = await self._punch(session, channels, purpose)
                elif route == "reverse":
                    chans = await self._reverse(session, channels, purpose)
                else:
                    chans = await self._direct(session, channels, purpose)
            except PeerdError as exc:
                if not session.alive:
                    raise
                event(log, "data.tcp_failed", peer=session.peer.short, route=route, error=exc)
        if chans is None:
            route = "quic"
            chans = await open_quic_channels(session, channels, purpose, self._config)
        self.routes_used[route] += 1
        link = DataLink(session.peer.text, chans, on_broken=self.on_broken)
        self._nursery.start_soon(link.run)
        return link

    async def _punch(self, session: Session, channels: int, purpose: str) -> list[DataChannel]:
        socks, ports = await bind_reserved(self._host, channels)
        try:
            tokens = tuple(os.urandom(16) for _ in range(channels))
            request = encode(DataPunchRequest(purpose, tuple(ports), tokens))
            reply = decode_untrusted(
                await self._call(session, DATA_PUNCH_METHOD, request),
                expect=DataPunchReply)
            if len(reply.ports) != channels or not all(0 < p < 65536 for p in reply.ports):
                raise ProtocolError("peer answered a data punch with a bad reply")
        except BaseException:
            for s in socks:
                s.close()
            raise
        return await punch_all(socks, self._host, session.conn.addr[0], reply.ports, tokens,
                               session, True, self._config)

    async def _direct(self, session: Session, channels: int, purpose: str) -> list[DataChannel]:
        """Dial the peer's listener, or, when that is filtered, it dials ours."""
        request = encode(DataOpenRequest(channels, purpose))
        reply = decode_untrusted(await self._call(session, DATA_OPEN_METHOD, request),
                                 expect=DataOpenReply)
        if len(reply.tokens) != channels or not 0 < reply.port < 65536:
            raise ProtocolError("peer answered a data-open request with a bad reply")
        try:
            chans = await self._dial_all(session, reply.port, reply.tokens, probe=True)
        except (PeerLost, AuthError, Timeout) as exc:
            event(log, "data.direct_failed", peer=session.peer.short, error=exc)
            chans = await self._reverse(session, channels, purpose)
        return chans

    async def _dial_all(self, session: Session, port: int, tokens: tuple[bytes, ...],
                        probe: bool) -> list[DataChannel]:
        host = session.conn.addr[0]
        chans: list[DataChannel] = []
        try:
            for i, token in enumerate(tokens):
                with trio.fail_after(DIRECT_DIAL_TIMEOUT if probe and i == 0 else math.inf):
                    chans.append(await dial_data_channel(host, port, token, session.keying,
                                                         session.peer.text, self._config))
        except trio.TooSlowError:
            for c in chans:
                c.abort()
            raise Timeout(f"no answer from {host}:{port} within {DIRECT_DIAL_TIMEOUT}s") from None
        except BaseException:
            for c in chans:
                c.abort()
            raise
        return chans

    async def _reverse(self, session: Session, channels: int, purpose: str) -> list[DataChannel]:
        now = trio.current_time()
        tokens = tuple(self._tokens.issue(session.peer.text, session.keying, TOKEN_TTL, now)
                       for _ in range(channels))
        waiter = _Inbound(channels, [], trio.Event())
        self._reverse_wait[session.peer] = waiter
        try:
            request = encode(DataReverseRequest(self.port, tokens, purpose))
            await self._call(session, DATA_REVERSE_METHOD, request)
            assert waiter.done is not None
            with trio.fail_after(TOKEN_TTL):
                await waiter.done.wait()
        except BaseException:
            for c in waiter.channels:
                c.abort()
            raise
        finally:
            del self._reverse_wait[session.peer]
        return waiter.channels

    async def outbound(self, peer: PeerId, purpose: str, opener: OpenLink) -> DataLink:
        """The live outbound link to ``peer``, opening one if needed."""
        key = (peer, purpose)
        link = self._out.get(key)
        if link is not None and not link.failed:  # the common case: no lock to take
            return link
        lock = self._out_locks.setdefault(key, trio.Lock())
        async with lock:
            link = self._out.get(key)
            if link is None or link.failed:
                link = await opener()
                self._out[key] = link
            return link

    async def inbound(self, peer: PeerId, purpose: str,
                      session_closed: Callable[[], trio.Event | None]) -> DataLink:
        """The live inbound link from ``peer``; waits for the peer to open one,
        raising ``PeerLost`` once no session to it is left. ``session_closed``
        gives the closed-event of the live session (None without one), asked
        again when that one closes: of two sessions dialled at once one is
        closed as a duplicate, and the peer is still there on the other."""
        while True:
            link = self._in.get((peer, purpose))
            if link is not None and not link.failed:
                return link
            closed = session_closed()
            if closed is None or closed.is_set():
                raise PeerLost([peer.text], "session closed")
            changed = self._in_changed
            async with trio.open_nursery() as nursery:
                async def watch(ended: trio.Event) -> None:
                    await ended.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(watch, closed)
                await changed.wait()
                nursery.cancel_scope.cancel()

    def discard(self, prefix: bytes) -> None:
        for link in self._in.values():
            link.discard(prefix)

    def received_from(self, peer: PeerId, purpose: str) -> int:
        """Payload bytes the inbound link of ``purpose`` from ``peer`` has
        received (0 without one; a replaced link starts again from 0)."""
        link = self._in.get((peer, purpose))
        return link.bytes_received if link is not None else 0

    def abandon(self, peer: PeerId, purpose: str) -> None:
        """Cancelled sends to ``peer`` stop waiting to drain (``DataLink.abandon``)."""
        link = self._out.get((peer, purpose))
        if link is not None:
            link.abandon()

    def peer_lost(self, peer: PeerId) -> None:
        for table in (self._out, self._in):
            for key in [k for k in table if k[0] == peer]:
                self._nursery.start_soon(table.pop(key).aclose)
        self._in_pending.pop(peer, None)

    def link_statistics(self) -> dict[str, LinkStats]:
        out = {f"out:{p.short}:{u}": link.statistics() for (p, u), link in self._out.items()}
        out.update({f"in:{p.short}:{u}": link.statistics() for (p, u), link in self._in.items()})
        return out

    async def aclose(self) -> None:
        for link in [*self._out.values(), *self._in.values()]:
            await link.aclose()

