"""Opening data channels: the dialer's preamble, the listener, key confirmation.

The dialer sends ``MAGIC | version | token`` and, in the same write, a CONFIRM
record sealed with its initiator->responder key. The listener takes the token
from its ``TokenTable`` (unknown, expired or reused: close at once and count
it), answers with its own CONFIRM record and checks the dialer's. Each side
therefore proves it holds the session secret before any message flows, and the
listener spends at most ``DATA_HANDSHAKE_TIMEOUT`` and one small buffer on a
stranger. Everything after that is ``peerd.datastream.DataChannel``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from peerd import datapump
from peerd.dataproto import (
    CONFIRM_TEXT,
    PREAMBLE_SIZE,
    Kind,
    TokenTable,
    encode_preamble,
    parse_preamble,
)
from peerd.datasock import DEFAULT_CONGESTION
from peerd.datastream import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_SOCKET_BUFFER,
    ChannelStats,
    DataChannel,
    SocketTransport,
    Transport,
    recv_exactly,
    tune_socket,
)
from peerd.errors import AuthError, PeerLost, ProtocolError, Timeout
from peerd.log import event
from peerd.record import (
    DEFAULT_MAX_PLAINTEXT,
    DEFAULT_REKEY_INTERVAL,
    TAG_SIZE,
    Keying,
    record_pair,
)

__all__ = [
    "DATA_HANDSHAKE_TIMEOUT", "ChannelStats", "DataChannel", "DataConfig", "DataListener",
    "ListenerStats", "dial_data_channel",
]

DATA_HANDSHAKE_TIMEOUT: Final = 10.0
CRYPTO_THREAD_CORES: Final = 4
DEFAULT_MAX_PENDING: Final = 64
ACCEPT_BACKOFF: Final = 0.1
_log = logging.getLogger("peerd.datachan")
_CONFIRM_LIMIT: Final = 256


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class DataConfig:
    """Knobs shared by both ends of a data channel (both must agree on records)."""

    max_record: int = DEFAULT_MAX_PLAINTEXT
    max_message: int = DEFAULT_MAX_MESSAGE
    # Asked of each direction's socket buffer where the kernel grants more than
    # its autotuning reaches, else autotuned (``peerd.datasock.fixed_buffer``);
    # 0: always autotuned.
    socket_buffer: int = DEFAULT_SOCKET_BUFFER
    rekey_interval: int = DEFAULT_REKEY_INTERVAL
    # Move large messages on worker threads: socket I/O and cipher of a whole
    # message per thread hop, GIL released for both (``DataChannel``). None:
    # only where the native record loops are missing and this process may run
    # on CRYPTO_THREAD_CORES. The native loops seal and write (read and open)
    # a whole message in one C call on the event loop; a hop per message then
    # costs more than it frees: the worker takes the GIL back several times
    # per job (strace of one peer's 10M rounds: ~860 futex calls a round with
    # every worker thread on, 16 with none), and with a core per peer (2
    # peers, 2 cores) 100M into ``out=`` took 0.195-0.256 s with message hops
    # against 0.164-0.193 without (reductions on threads or not).
    # Without the native loops, Python's per-record work is what the threads
    # spread over cores (16 cores, Python loops: 100M in 0.34-0.39 s with
    # threads against 0.72 on the event loop).
    crypto_threads: bool | None = None
    # Seal, write, read and open a message's records in native code
    # (``peerd.datapump``) where it is built and switched on; False: never.
    native: bool = True
    # TCP congestion control of this end's data sockets (each end picks its
    # own; see ``peerd.datasock.DEFAULT_CONGESTION``); "system": the host's.
    congestion: str = DEFAULT_CONGESTION
    # Unsent bytes each data socket may hold (``peerd.datasock.DEFAULT_NOTSENT_LOWAT``);
    # 0: the kernel's default, a whole send buffer. Nodes set the bound
    # (``NodeConfig.data_notsent_lowat``): their links' readers always read.
    # A bare channel keeps the kernel's: with a bound, a send larger than the
    # bound and the far end's window waits until the far end reads.
    notsent_lowat: int = 0

    def tune(self, sock: trio.socket.SocketType) -> None:
        """This config's socket options on ``sock`` (``peerd.datasock.tune_socket``)."""
        tune_socket(sock, self.socket_buffer, self.congestion, self.notsent_lowat)

    def offload(self) -> bool:
        if self.crypto_threads is not None:
            return self.crypto_threads
        return not (self.native and datapump.available()) and threads_pay(None)

    def use_native(self) -> bool:
        return self.native and datapump.built()


def threads_pay(setting: bool | None) -> bool:
    """Whether the ring's reductions and result copies go to worker threads:
    ``setting`` if given, else whether this process may use
    CRYPTO_THREAD_CORES (data channels without the native record loops decide
    alike, ``DataConfig.offload``)."""
    if setting is not None:
        return setting
    return usable_cores() >= CRYPTO_THREAD_CORES


async def _confirm(
    transport: Transport, token: bytes, keying: Keying, initiator: bool, peer: str,
    config: DataConfig, preamble: bytes = b"",
) -> DataChannel:
    """Exchange CONFIRM records; returns the keyed channel."""
    sealer, opener = record_pair(
        keying, token, initiator, config.max_record, config.rekey_interval
    )
    await transport.send_all(preamble + sealer.seal(Kind.CONFIRM, CONFIRM_TEXT))
    hdr = memoryview(bytearray(5))
    await recv_exactly(transport, hdr)
    kind, n = opener.parse_header(hdr)
    if kind != Kind.CONFIRM or n > _CONFIRM_LIMIT:
        raise ProtocolError("expected a key confirmation record")
    body = memoryview(bytearray(n + TAG_SIZE))
    await recv_exactly(transport, body)
    plain = bytearray(n)
    opener.open_into(kind, body, memoryview(plain))
    if plain != CONFIRM_TEXT:
        raise ProtocolError("wrong key confirmation text")
    return DataChannel(
        transport, sealer, opener, peer, token, config.max_record, config.max_message,
        config.offload(), config.use_native(), config.notsent_lowat,
    )


async def dial_data_channel(
    host: str, port: int, token: bytes, keying: Keying, peer: str,
    config: DataConfig = DataConfig(),
) -> DataChannel:
    """Connect to a peer's ``DataListener`` and prove the keys for ``token``.

    Raises ``PeerLost`` if the address cannot be reached, ``AuthError`` if the
    listener refuses the token or fails to confirm the keys, ``Timeout`` after
    ``DATA_HANDSHAKE_TIMEOUT``.
    """
    sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET)
    transport = SocketTransport(sock)
    try:
        with trio.fail_after(DATA_HANDSHAKE_TIMEOUT):
            config.tune(sock)
            try:
                await sock.connect((host, port))
            except OSError as exc:
                raise PeerLost([peer], f"data dial to {host}:{port} failed: {exc}") from None
            return await _confirm(
                transport, token, keying, True, peer, config, encode_preamble(token)
            )
    except trio.TooSlowError:
        sock.close()
        raise Timeout(f"data channel handshake with {peer} took over "
                      f"{DATA_HANDSHAKE_TIMEOUT} s") from None
    except (EOFError, OSError, ProtocolError) as exc:
        sock.close()
        raise AuthError(f"data listener of {peer} refused or failed the handshake: "
                        f"{exc!r}") from None
    except BaseException:
        sock.close()
        raise


@dataclass
class _Counters:
    accepted: int = 0
    refused_busy: int = 0
    bad_preamble: int = 0
    bad_token: int = 0
    bad_confirm: int = 0
    timeouts: int = 0
    aborted: int = 0
    callback_errors: int = 0
    pending: int = 0


@dataclass(frozen=True)
class ListenerStats:
    accepted: int
    refused_busy: int
    bad_preamble: int
    bad_token: int
    bad_confirm: int
    timeouts: int
    aborted: int
    callback_errors: int
    pending: int


class DataListener:
    """Accepts data connections that present a token from ``tokens``.

    ``on_channel(peer, channel)`` is called for each authenticated channel and
    takes ownership of it (it must eventually ``aclose`` it). Strangers cost a
    bounded handshake: at most ``max_pending`` at once (more are closed on
    accept), each for at most ``DATA_HANDSHAKE_TIMEOUT``.
    """

    def __init__(
        self,
        tokens: TokenTable,
        on_channel: Callable[[str, DataChannel], None],
        host: str = "127.0.0.1",
        port: int = 0,
        max_pending: int = DEFAULT_MAX_PENDING,
        config: DataConfig = DataConfig(),
    ) -> None:
        self._tokens = tokens
        self._on_channel = on_channel
        self._host = host
        self._want_port = port
        self._max_pending = max_pending
        self._config = config
        self._c = _Counters()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through ``task_status``, serve until cancelled."""
        family = trio.socket.AF_INET6 if ":" in self._host else trio.socket.AF_INET
        lsock = trio.socket.socket(family)
        with lsock:
            lsock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            # Inherited by accepted sockets.
            self._config.tune(lsock)
            await lsock.bind((self._host, self._want_port))
            lsock.listen(128)
            self.port = lsock.getsockname()[1]
            task_status.started(self.port)
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await lsock.accept()
                    except OSError as exc:
                        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                             errno.ENOMEM, errno.ECONNABORTED):
                            raise
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    if self._c.pending >= self._max_pending:
                        self._c.refused_busy += 1
                        conn.close()
                        continue
                    self._c.pending += 1
                    nursery.start_soon(self._admit, conn)

    async def _admit(self, conn: trio.socket.SocketType) -> None:
        transport = SocketTransport(conn)
        channel: DataChannel | None = None
        reason = ""
        try:
            with trio.move_on_after(DATA_HANDSHAKE_TIMEOUT):
                channel = await self._handshake(transport)
            if channel is None and not reason:
                self._c.timeouts += 1
                reason = "timeout"
        except _Refused as exc:
            reason = exc.reason
        except ProtocolError:
            self._c.bad_confirm += 1
            reason = "bad_confirm"
        except (EOFError, OSError):
            self._c.aborted += 1
            reason = "aborted"
        finally:
            self._c.pending -= 1
            if channel is None:
                conn.close()
        if channel is None:
            event(_log, "data_conn_refused", logging.DEBUG, reason=reason)
            return
        self._c.accepted += 1
        try:
            self._on_channel(channel.peer, channel)
        except Exception as exc:
            self._c.callback_errors += 1
            event(_log, "data_on_channel_failed", logging.WARNING, error=repr(exc))
            channel.abort()

    async def _handshake(self, transport: Transport) -> DataChannel:
        pre = memoryview(bytearray(PREAMBLE_SIZE))
        await recv_exactly(transport, pre)
        try:
            token = parse_preamble(pre)
        except ProtocolError:
            self._c.bad_preamble += 1
            raise _Refused("bad_preamble") from None
        grant = self._tokens.take(token, trio.current_time())
        if grant is None:
            self._c.bad_token += 1
            raise _Refused("bad_token")
        peer, keying = grant
        return await _confirm(transport, token, keying, False, peer, self._config)

    def statistics(self) -> ListenerStats:
        c = self._c
        return ListenerStats(
            c.accepted, c.refused_busy, c.bad_preamble, c.bad_token, c.bad_confirm,
            c.timeouts, c.aborted, c.callback_errors, c.pending,
        )


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
