"""Trio driver for aioquic's sans-I/O ``QuicConnection`` on one UDP socket.

One ``QuicEndpoint`` owns the node's UDP socket: it demultiplexes datagrams
by destination connection id, creates server connections for new Initials
(subject to a pending cap), and hands non-QUIC datagrams (first byte without
the 0x40 fixed bit: hole-punch probes) to a callback. Each ``QuicConn`` has one
timer task; ``QuicStream`` adds backpressure on top of aioquic's unbounded
send buffer. Nothing here knows about peer identities; ``peerd.session`` does.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Protocol

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from peerd.errors import PeerLost, ProtocolError
from peerd.wire import DEFAULT_LIMITS, FRAME_HEADER, FrameDecoder, Limits

Address = tuple[str, int]

KEEPALIVE_INTERVAL = 5.0  # keeps NAT mappings open (many expire after ~30 s)
IDLE_TIMEOUT = 20.0  # a silent peer is declared gone after this
STREAM_HIGH_WATER = 256 * 1024  # unacknowledged bytes per stream before send() waits
MAX_PENDING_STREAMS = 64  # peer-opened streams not yet accepted
MAX_DATAGRAM = 65535
BATCH = 64  # datagrams handled per wakeup before answering
ERROR_AUTH = 0x100  # application close code: authentication or admission failed


def stream_backlog(quic: QuicConnection, stream_id: int) -> int:
    """Bytes queued but not yet acknowledged on ``stream_id``.

    aioquic exposes no public accessor, so this is the one place that reads
    its sender buffer (a test pins it).
    """
    stream = quic._streams.get(stream_id)
    if stream is None or stream.sender._reset_error_code is not None:
        return 0  # a reset stream's leftover bytes will never be sent
    return len(stream.sender._buffer)


def unacked_bytes(quic: QuicConnection, skip: Container[int] = ()) -> int:
    """Bytes sent on the connection's streams (but those in ``skip``) and not
    yet acknowledged."""
    return sum(stream_backlog(quic, sid) for sid in list(quic._streams) if sid not in skip)


class DatagramSink(Protocol):
    """What a ``QuicConn`` needs from the thing that carries its datagrams:
    the node's UDP socket (``QuicEndpoint``) or a relay circuit (``peerd.nat_pipe``)."""

    _conns: dict[bytes, QuicConn]

    def send_raw(self, data: bytes, addr: Address) -> None: ...
    def _forget(self, conn: QuicConn) -> None: ...


class QuicStream:
    """A bidirectional stream with frame helpers and send backpressure."""

    def __init__(self, conn: QuicConn, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._chunks: list[bytes] = []
        self._eof = False
        self._error: Exception | None = None
        self._readable = trio.Event()
        self._decoder: FrameDecoder | None = None
        self._frames: list[bytes] = []

    # -- events from the connection
    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
        if end:
            self._eof = True
        self._readable.set()

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._readable.set()

    # -- user API
    async def send(self, data: bytes, end: bool = False) -> None:
        while stream_backlog(self.conn.quic, self.stream_id) > STREAM_HIGH_WATER:
            if self._error is not None:
                raise self._error
            await self.conn._wait_progress()
        if self._error is not None:
            raise self._error
        if self.conn.closed:
            raise PeerLost([self.conn.addr_text], self.conn.close_reason)
        try:
            self.conn.quic.send_stream_data(self.stream_id, data, end_stream=end)
        except (ValueError, RuntimeError) as exc:
            # aioquic refuses data on a stream the peer reset or we finished.
            raise PeerLost([self.conn.addr_text], f"stream closed: {exc}") from None
        self.conn.transmit()

    async def send_frame(self, body: bytes, end: bool = False) -> None:
        await self.send(FRAME_HEADER.pack(len(body)) + body, end)

    async def peek(self, n: int) -> bytes:
        """Up to the first ``n`` unread bytes, without consuming them (fewer
        only at end of stream). Used to route a stream before reading it."""
        while sum(map(len, self._chunks)) < n and not self._eof:
            if self._error is not None:
                raise self._error
            self._readable = trio.Event()
            await self._readable.wait()
        return b"".join(self._chunks)[:n]

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, leaving the rest unread; ``PeerLost`` if the
        stream ends first."""
        head = await self.peek(n)
        if len(head) < n:
            raise PeerLost([self.addr_text], "stream ended early")
        rest = b"".join(self._chunks)[n:]
        self._chunks = [rest] if rest else []
        return head

    @property
    def addr_text(self) -> str:
        return self.conn.addr_text

    async def receive_some(self) -> bytes:
        """Next bytes; ``b""`` at end of stream."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._readable = trio.Event()
            await self._readable.wait()
        return self._chunks.pop(0)

    async def receive_frame(self, limits: Limits = DEFAULT_LIMITS) -> bytes:
        """Next complete frame body; ``ProtocolError`` on garbage or early end."""
        if self._decoder is None:
            self._decoder = FrameDecoder(limits)
        while not self._frames:
            data = await self.receive_some()
            if not data:
                raise ProtocolError("stream ended inside a frame" if self._decoder.buffered
                                    else "stream ended")
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)

    def finish(self) -> None:
        """Forget a stream whose exchange is complete in both directions."""
        self.conn._streams.pop(self.stream_id, None)

    def reset(self, code: int = 0) -> None:
        """Abort both directions (cancellation of an RPC)."""
        if self.conn.closed:
            return
        try:
            self.conn.quic.reset_stream(self.stream_id, code)
            self.conn.quic.stop_stream(self.stream_id, code)
        except Exception:  # already finished or reset: nothing left to abort
            pass
        self.conn.transmit()
        self.conn._streams.pop(self.stream_id, None)


@dataclass
class ConnStats:
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class QuicConn:
    """One QUIC connection; created by ``QuicEndpoint``."""

    def __init__(self, endpoint: DatagramSink, quic: QuicConnection, addr: Address) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.addr = addr
        self.handshake_done = trio.Event()
        self.closed_event = trio.Event()
        self.close_reason = ""
        self.stats = ConnStats()
        self._streams: dict[int, QuicStream] = {}
        self._incoming_send, self.incoming = trio.open_memory_channel[QuicStream](
            MAX_PENDING_STREAMS)
        self._progress = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._last_sent = trio.current_time()
        self.accept_streams = True

    @property
    def closed(self) -> bool:
        return self.closed_event.is_set()

    def open_stream(self) -> QuicStream:
        if self.closed:
            raise PeerLost([self.addr_text], self.close_reason or "connection closed")
        sid = self.quic.get_next_available_stream_id()
        stream = QuicStream(self, sid)
        self._streams[sid] = stream
        return stream

    @property
    def addr_text(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    async def wait_acknowledged(self) -> None:
        """Until the peer has acknowledged what was sent on the streams this
        side is done with (a one-way message is done once queued), or the
        connection ends. Streams still open (a relay circuit, say) are not
        waited for: they may never fall quiet."""
        while not self.closed and unacked_bytes(self.quic, skip=self._streams):
            await self._wait_progress()

    async def _wait_progress(self) -> None:
        if self.closed:
            raise PeerLost([self.addr_text], self.close_reason)
        self._progress = trio.Event() if self._progress.is_set() else self._progress
        await self._progress.wait()

    def close(self, code: int = 0, reason: str = "") -> None:
        if not self.closed and self.quic._state not in (
            QuicConnectionState.CLOSING, QuicConnectionState.DRAINING,
            QuicConnectionState.TERMINATED,
        ):
            self.quic.close(error_code=code, reason_phrase=reason)
            self.transmit()
        self._mark_closed(reason or "closed locally")

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self.closed_event.set()
        err = PeerLost([self.addr_text], reason)
        for stream in self._streams.values():
            stream._fail(err)
        self._streams.clear()
        self._incoming_send.close()
        self._progress.set()
        self.endpoint._forget(self)

    # -- driving the sans-I/O connection
    def datagram_received(self, data: bytes, addr: Address, now: float) -> bool:
        """Feed one datagram; the carrier calls ``flush`` after a batch. False
        when it ended this connection: aioquic should not raise, but a
        stranger's packet (on the UDP socket or through a relay circuit) never
        ends more than its connection."""
        self.stats.datagrams_in += 1
        self.stats.bytes_in += len(data)
        self.addr = addr  # follow NAT rebinding; aioquic validates the path itself
        try:
            self.quic.receive_datagram(data, addr, now)
            self._process_events()
        except Exception as exc:
            self._mark_closed(f"internal error on datagram: {type(exc).__name__}")
            return False
        return True

    def flush(self) -> None:
        """Send what the batch of received datagrams calls for, wake senders."""
        self.transmit()
        self._progress.set()

    def transmit(self) -> None:
        now = trio.current_time()
        try:
            datagrams = self.quic.datagrams_to_send(now=now)
        except Exception as exc:
            # aioquic left in a state it cannot send from (a stranger's packet
            # did that once: an Initial of an unknown version left no network
            # path, and the IndexError ended the endpoint). This connection
            # ends; the node and its other connections go on.
            self._mark_closed(f"internal error on send: {type(exc).__name__}")
            return
        for data, addr in datagrams:
            self.stats.datagrams_out += 1
            self.stats.bytes_out += len(data)
            self.endpoint.send_raw(data, addr)
            self._last_sent = now
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._next_wake()

    def _next_wake(self) -> float:
        t = self.quic.get_timer()
        keepalive = self._last_sent + KEEPALIVE_INTERVAL
        return min(t if t is not None else math.inf, keepalive)

    def _process_events(self) -> None:
        ep = self.endpoint
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                stream = self._streams.get(ev.stream_id)
                if stream is None:
                    stream = self._new_peer_stream(ev.stream_id)
                    if stream is None:
                        continue
                stream._feed(ev.data, ev.end_stream)
            elif isinstance(ev, events.StreamReset):
                stream = self._streams.pop(ev.stream_id, None)
                if stream is not None:
                    stream._fail(PeerLost([self.addr_text], "stream reset by peer"))
            elif isinstance(ev, events.HandshakeCompleted):
                self.handshake_done.set()
            elif isinstance(ev, events.ConnectionIdIssued):
                ep._conns[ev.connection_id] = self
            elif isinstance(ev, events.ConnectionIdRetired):
                ep._conns.pop(ev.connection_id, None)
            elif isinstance(ev, events.ConnectionTerminated):
                self._mark_closed(ev.reason_phrase or f"terminated (code {ev.error_code})")

    def _new_peer_stream(self, sid: int) -> QuicStream | None:
        if not self.accept_streams or sid % 4 != (1 if self.quic._is_client else 0):
            # Unidirectional streams are not used, and before admission a peer
            # may open only the handshake stream: drop the data unread.
            return None
        stream = QuicStream(self, sid)
        try:
            self._incoming_send.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.quic.reset_stream(sid, 2)  # too many unanswered streams: refuse this one
            return None
        self._streams[sid] = stream
        return stream

    async def run_timer(self) -> None:
        while not self.closed:
            with trio.CancelScope(deadline=self._next_wake()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            timer = self.quic.get_timer()
            if timer is not None and now >= timer:
                try:
                    self.quic.handle_timer(now)
                except Exception as exc:  # as in ``transmit``: this connection ends, not the node
                    self._mark_closed(f"internal error on timer: {type(exc).__name__}")
                    return
                self._process_events()
            if now >= self._last_sent + KEEPALIVE_INTERVAL and self.handshake_done.is_set():
                self.quic.send_ping(0)
            self.transmit()
            if self.quic._state == QuicConnectionState.TERMINATED:
                self._mark_closed(self.close_reason or "idle timeout")


class QuicEndpoint:
    """The node's UDP socket with every QUIC connection on it."""

    def __init__(
        self,
        sock: socket.socket,
        client_config: Callable[[], QuicConfiguration],
        server_config: Callable[[], QuicConfiguration],
        nursery: trio.Nursery,
        on_accept: Callable[[QuicConn], None],
        max_pending: int,
        on_raw: Callable[[bytes, Address], None] | None = None,
    ) -> None:
        self.sock = sock
        self._client_config = client_config
        self._server_config = server_config
        self._nursery = nursery
        self._on_accept = on_accept
        self._on_raw = on_raw
        self.max_pending = max_pending
        self.pending = 0  # server connections not yet authenticated (the node decrements)
        self._conns: dict[bytes, QuicConn] = {}
        self.counters: dict[str, int] = {"dropped_garbage": 0, "dropped_pending_cap": 0,
                                         "send_errors": 0, "version_negotiations": 0}
        self._versions = list(server_config().supported_versions)

    @property
    def local_address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def set_raw_handler(self, on_raw: Callable[[bytes, Address], None] | None) -> None:
        """Where non-QUIC datagrams (hole-punch probes) go; None drops them."""
        self._on_raw = on_raw

    def client_configuration(self) -> QuicConfiguration:
        return self._client_config()

    def server_configuration(self) -> QuicConfiguration:
        return self._server_config()

    def send_raw(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError, OSError):
            # UDP: a full buffer or unreachable host is a lost packet; QUIC retransmits.
            self.counters["send_errors"] += 1

    def connect(self, addr: Address) -> QuicConn:
        quic = QuicConnection(configuration=self._client_config())
        conn = QuicConn(self, quic, addr)
        self._conns[quic.host_cid] = conn
        quic.connect(addr, now=trio.current_time())
        self._nursery.start_soon(conn.run_timer)
        conn.transmit()
        return conn

    def _forget(self, conn: QuicConn) -> None:
        for cid in [c for c, v in self._conns.items() if v is conn]:
            del self._conns[cid]

    def connections(self) -> set[QuicConn]:
        return set(self._conns.values())

    async def serve(self) -> None:
        touched: set[QuicConn] = set()
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            # Drain what is queued, then answer once per connection: building
            # packets is aioquic's most expensive step, so batching ACKs and
            # replies over many datagrams multiplies throughput.
            for _ in range(BATCH):
                try:
                    data, addr = self.sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # ICMP errors surface here on Linux; they are not fatal
                conn = self._datagram(data, (addr[0], addr[1]))
                if conn is not None:
                    touched.add(conn)
            for conn in touched:
                if not conn.closed:
                    conn.flush()
            touched.clear()
            await trio.lowlevel.checkpoint()

    def _datagram(self, data: bytes, addr: Address) -> QuicConn | None:
        if not data:
            return None
        if not data[0] & 0x40:
            if self._on_raw is not None:
                self._on_raw(data, addr)
            else:
                self.counters["dropped_garbage"] += 1
            return None
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except Exception:  # any parse failure of a stranger's packet: drop it
            self.counters["dropped_garbage"] += 1
            return None
        conn = self._conns.get(header.destination_cid)
        if conn is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
                self.counters["dropped_garbage"] += 1
                return None
            if header.version not in self._versions:
                # RFC 9000 6.1: answer with the versions we speak (a few dozen
                # bytes for the client's 1200: nothing to amplify). aioquic
                # cannot take such a packet: it keeps no path to answer on.
                self.counters["version_negotiations"] += 1
                self.send_raw(encode_quic_version_negotiation(
                    source_cid=header.destination_cid, destination_cid=header.source_cid,
                    supported_versions=self._versions), addr)
                return None
            if self.pending >= self.max_pending:
                self.counters["dropped_pending_cap"] += 1
                return None
            try:
                quic = QuicConnection(configuration=self._server_config(),
                                      original_destination_connection_id=header.destination_cid)
            except Exception:
                self.counters["dropped_garbage"] += 1
                return None
            conn = QuicConn(self, quic, addr)
            self._conns[header.destination_cid] = conn
            self._conns[quic.host_cid] = conn
            self.pending += 1
            self._nursery.start_soon(conn.run_timer)
            self._on_accept(conn)
        if not conn.datagram_received(data, addr, trio.current_time()):
            self.counters["dropped_garbage"] += 1
            return None
        return conn
