"""Turning a QUIC connection into an authenticated, admitted session.

``client_session`` / ``server_session`` run ``peerd.handshake`` over the
connection's first stream under ``HANDSHAKE_TIMEOUT``; anything that fails
closes the connection with ``ERROR_AUTH`` and raises ``AuthError`` (or
``ProtocolError`` for garbage). Until admission the server accepts no stream
but the handshake stream, so a stranger cannot reach any RPC handler.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from peerd.errors import AuthError, PeerLost, ProtocolError, Timeout
from peerd.handshake import ClientHandshake, HandshakeResult, ServerHandshake
from peerd.identity import Identity, PeerId, SwarmKey
from peerd.quic import ERROR_AUTH, QuicConn
from peerd.record import Keying
from peerd.tlscert import peer_certificate_key
from peerd.wire import Limits

HANDSHAKE_TIMEOUT = 10.0
_HANDSHAKE_LIMITS = Limits(max_frame=4096, max_bin=1024, max_str=256, max_items=16, max_depth=2)


@dataclass(eq=False)
class Session:
    """An authenticated connection to one peer."""

    conn: QuicConn
    peer: PeerId
    me: PeerId
    keying: Keying  # the session secret and the data plane's record cipher
    initiator: bool  # True when we dialled
    observed: tuple[str, int] | None  # our address as the peer saw it
    incarnation: bytes = b""  # the peer's process (peerd/handshake.py)
    # A duplicate its dialler retires (peerd/node.py): start no new calls on it.
    retiring: bool = field(default=False, init=False)
    calls_out: int = field(default=0, init=False)  # our calls on it not ended yet
    _calls_ended: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    @property
    def alive(self) -> bool:
        return not self.conn.closed

    @contextmanager
    def outgoing_call(self) -> Iterator[None]:
        """Count one of our calls on this session while it runs."""
        self.calls_out += 1
        try:
            yield
        finally:
            self.calls_out -= 1
            if self.calls_out == 0:
                self._calls_ended.set()
                self._calls_ended = trio.Event()

    async def drained(self) -> None:
        """Until our calls on it have ended and the peer holds everything we
        sent on it (so closing loses no one-way message), or it closed."""
        while self.calls_out and self.alive:
            await self._calls_ended.wait()
        await self.conn.wait_acknowledged()

    @property
    def client_id(self) -> PeerId:
        """Id of the side that dialled; used to break ties between duplicates."""
        return self.me if self.initiator else self.peer


async def client_session(conn: QuicConn, identity: Identity, swarm_key: SwarmKey,
                         expected: PeerId | None = None,
                         incarnation: bytes | None = None,
                         ciphers: tuple[str, ...] | None = None) -> Session:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await _wait_or_closed(conn)
            hs = ClientHandshake(identity, swarm_key, peer_certificate_key(conn.quic), expected,
                                 incarnation=incarnation, ciphers=ciphers)
            stream = conn.open_stream()
            await stream.send_frame(hs.hello())
            finish = hs.on_server_hello(await stream.receive_frame(_HANDSHAKE_LIMITS))
            await stream.send_frame(finish, end=True)
            result = hs.on_accept(await stream.receive_frame(_HANDSHAKE_LIMITS))
            stream.finish()
    except trio.TooSlowError:
        conn.close(ERROR_AUTH, "handshake timeout")
        raise Timeout(_client_timeout_text(conn)) from None
    except PeerLost as exc:
        raise AuthError(f"{conn.addr_text} refused us: {conn.close_reason or exc}") from None
    except (AuthError, ProtocolError) as exc:
        conn.close(ERROR_AUTH, "authentication failed")
        raise AuthError(f"{conn.addr_text}: {exc}") from None
    return _session(conn, result, identity, initiator=True)


async def server_session(conn: QuicConn, identity: Identity, swarm_key: SwarmKey,
                         incarnation: bytes | None = None,
                         ciphers: tuple[str, ...] | None = None) -> Session:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await conn.incoming.receive()
            conn.accept_streams = False  # nothing but the handshake until admitted
            hs = ServerHandshake(identity, swarm_key, conn.addr, incarnation=incarnation,
                                 ciphers=ciphers)
            hello = await stream.receive_frame(_HANDSHAKE_LIMITS)
            await stream.send_frame(hs.on_client_hello(hello))
            accept, result = hs.on_client_finish(await stream.receive_frame(_HANDSHAKE_LIMITS))
            await stream.send_frame(accept, end=True)
            stream.finish()
    except trio.TooSlowError:
        conn.close(ERROR_AUTH, "handshake timeout")
        raise Timeout(f"handshake from {conn.addr_text} timed out") from None
    except (trio.EndOfChannel, trio.ClosedResourceError, PeerLost):
        raise AuthError(f"{conn.addr_text} left during the handshake") from None
    except (AuthError, ProtocolError) as exc:
        conn.close(ERROR_AUTH, "authentication failed")
        raise AuthError(f"{conn.addr_text}: {exc}") from None
    conn.accept_streams = True
    return _session(conn, result, identity, initiator=False)


def _client_timeout_text(conn: QuicConn) -> str:
    """What a dialler that timed out should check: silence at the QUIC layer
    is a wrong address or a blocked path, not the far node's doing."""
    if not conn.handshake_done.is_set():
        return (f"no answer from {conn.addr_text} within {HANDSHAKE_TIMEOUT:g} s: check the "
                "address and port, that a peerd node runs there, and that UDP to it is not "
                "blocked (peerd speaks QUIC over UDP)")
    return (f"{conn.addr_text} answered but did not finish peerd's handshake within "
            f"{HANDSHAKE_TIMEOUT:g} s (overloaded, or not a peerd node)")


async def _wait_or_closed(conn: QuicConn) -> None:
    async with trio.open_nursery() as nursery:
        async def closed() -> None:
            await conn.closed_event.wait()
            nursery.cancel_scope.cancel()
        nursery.start_soon(closed)
        await conn.handshake_done.wait()
        nursery.cancel_scope.cancel()
    if conn.closed:
        raise PeerLost([conn.addr_text], conn.close_reason)


def _session(conn: QuicConn, result: HandshakeResult, identity: Identity,
             initiator: bool) -> Session:
    return Session(conn, result.peer_id, identity.peer_id, result.keying, initiator,
                   result.observed_address, result.incarnation)
