"""Data channels where a plain TCP dial cannot work.

* TCP simultaneous open: both peers bind fresh ports, tell each other the
  port numbers over the authenticated session and ``connect()`` to each
  other's public IP at once. Each SYN opens its own NAT's mapping; the
  kernel's SYN retransmission gets the first dropped SYN through once the
  other side's mapping exists, and Linux joins the crossing SYNs into one
  connection. It needs NATs that keep local port numbers (``NatInfo.
  port_preserving``), since neither side can observe its public TCP port.
* Channels over QUIC streams of the session: always possible, including on a
  relayed session, at QUIC's (pure Python) speed. A stream starts with
  ``QDATA_MAGIC | link id | channel count | purpose | token``.

Both produce ordinary ``DataChannel`` objects keyed from the session secret
and a per-channel token, with the usual key confirmation (``peerd.datachan``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from nat.punch_tcp import reuse_socket
from peerd.datachan import DataConfig, _confirm
from peerd.datastream import DataChannel, SocketTransport
from peerd.errors import PeerLost, ProtocolError, Timeout
from peerd.identity import PeerId
from peerd.nat_pipe import StreamTransport
from peerd.quic import QuicStream
from peerd.record import Keying
from peerd.session import Session
from peerd.wire import message

QDATA_MAGIC = b"\xffpdD"  # as a frame length this is > 4 GB: never a valid RPC stream
TOKEN = 16
LINK_ID = 8
PUNCH_DATA_TIMEOUT = 8.0
RETRY_AFTER_ERROR = 0.1
QUIC_CHANNEL_TIMEOUT = 10.0
MAX_PENDING_LINKS = 8  # QUIC-stream links being assembled, per node

Install = Callable[[PeerId, str, list[DataChannel]], None]


@message(723)
@dataclass(frozen=True)
class DataPunchRequest:
    """Open ``len(tokens)`` channels by simultaneous open; ``ports`` are ours."""

    purpose: str
    ports: tuple[int, ...]
    tokens: tuple[bytes, ...]


@message(724)
@dataclass(frozen=True)
class DataPunchReply:
    ports: tuple[int, ...]


# ------------------------------------------------------------ TCP simultaneous open


async def bind_reserved(host: str, n: int) -> tuple[list[trio.socket.SocketType], list[int]]:
    socks: list[trio.socket.SocketType] = []
    try:
        for _ in range(n):
            sock = reuse_socket(0)
            socks.append(sock)
            await sock.bind((host, 0))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks, [s.getsockname()[1] for s in socks]


async def simultaneous_open(
    sock: trio.socket.SocketType, host: str, remote: tuple[str, int], token: bytes,
    keying: Keying, peer: str, initiator: bool, config: DataConfig, timeout: float,
) -> DataChannel:
    """Connect ``sock`` (bound, not connected) to ``remote`` while the peer
    does the same towards us, then confirm keys. ``Timeout`` if no path."""
    port = sock.getsockname()[1]
    try:
        with trio.fail_after(timeout):
            while True:
                config.tune(sock)
                try:
                    await sock.connect(remote)
                    break
                except OSError:
                    sock.close()
                    await trio.sleep(RETRY_AFTER_ERROR)
                    sock = reuse_socket(port)
                    await sock.bind((host, port))
            return await _confirm(SocketTransport(sock), token, keying, initiator, peer, config)
    except trio.TooSlowError:
        sock.close()
        raise Timeout(f"no TCP path to {remote[0]}:{remote[1]} within {timeout:g}s") from None
    except (EOFError, OSError, ProtocolError) as exc:
        sock.close()
        raise PeerLost([peer], f"simultaneous open failed: {exc!r}") from None
    except BaseException:
        sock.close()
        raise


async def punch_all(
    socks: list[trio.socket.SocketType], host: str, remote_ip: str, ports: tuple[int, ...],
    tokens: tuple[bytes, ...], session: Session, initiator: bool, config: DataConfig,
) -> list[DataChannel]:
    """Every channel of a link at once; all or nothing."""
    if len(socks) != len(ports) or len(ports) != len(tokens):
        raise ProtocolError("port and token counts differ")
    chans: list[DataChannel | None] = [None] * len(socks)
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            chans[i] = await simultaneous_open(
                socks[i], host, (remote_ip, ports[i]), tokens[i], session.keying,
                session.peer.text, initiator, config, PUNCH_DATA_TIMEOUT)
        except (Timeout, PeerLost) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(len(socks)):
            nursery.start_soon(one, i)
    done = [c for c in chans if c is not None]
    if errors or len(done) != len(socks):
        for c in done:
            c.abort()
        raise errors[0] if errors else Timeout("simultaneous open incomplete")
    return done


# ------------------------------------------------------------ channels over QUIC streams


async def open_quic_channels(session: Session, n: int, purpose: str,
                             config: DataConfig) -> list[DataChannel]:
    """``n`` data channels over new QUIC streams of ``session``."""
    link_id = os.urandom(LINK_ID)
    name = purpose.encode()
    chans: list[DataChannel] = []
    try:
        with trio.fail_after(QUIC_CHANNEL_TIMEOUT):
            for _ in range(n):
                stream = session.conn.open_stream()
                token = os.urandom(TOKEN)
                await stream.send(QDATA_MAGIC + link_id + bytes([n, len(name)]) + name + token)
                chans.append(await _confirm(StreamTransport(stream), token, session.keying, True,
                                            session.peer.text, config))
    except trio.TooSlowError:
        for c in chans:
            c.abort()
        raise Timeout(f"QUIC data channels to {session.peer.short} timed out") from None
    except (EOFError, ProtocolError) as exc:
        for c in chans:
            c.abort()
        raise PeerLost([session.peer.text], f"QUIC data channel failed: {exc!r}") from None
    return chans


class QuicChannelInbox:
    """Assembles links from the QUIC data streams a peer opens to us."""

    def __init__(self, install: Install, config: DataConfig) -> None:
        self._install = install
        self._config = config
        self._pending: dict[tuple[PeerId, bytes], tuple[str, int, list[DataChannel]]] = {}

    async def take(self, stream: QuicStream, session: Session) -> None:
        with trio.fail_after(QUIC_CHANNEL_TIMEOUT):
            head = await stream.receive_exactly(len(QDATA_MAGIC) + LINK_ID + 2)
            link_id = head[len(QDATA_MAGIC):len(QDATA_MAGIC) + LINK_ID]
            n, name_len = head[-2], head[-1]
            if not 1 <= n <= 64 or name_len > 64:
                raise ProtocolError("bad QUIC data channel header")
            purpose = (await stream.receive_exactly(name_len)).decode(errors="replace")
            token = await stream.receive_exactly(TOKEN)
            chan = await _confirm(StreamTransport(stream), token, session.keying, False,
                                  session.peer.text, self._config)
        key = (session.peer, link_id)
        if key not in self._pending:
            while len(self._pending) >= MAX_PENDING_LINKS:
                _, (_, _, stale) = self._pending.popitem()
                for c in stale:
                    c.abort()
            self._pending[key] = (purpose, n, [])
        want_purpose, want, chans = self._pending[key]
        chans.append(chan)
        if len(chans) >= want:
            del self._pending[key]
            self._install(session.peer, want_purpose, chans)
