"""QUIC over a byte stream, and byte streams over QUIC streams.

A relay circuit is a byte pipe between two peers through a third (see
``peerd.nat_relay``). ``PipeEndpoint`` runs one end-to-end QUIC connection
over such a pipe: each QUIC datagram travels as ``u16 length | datagram``, so
the relay forwards only TLS-protected QUIC packets and the normal peerd
handshake authenticates the two ends to each other, not to the relay.
Datagrams that find the outgoing queue full are dropped like UDP packets;
QUIC's loss recovery and congestion control handle that.

``StreamTransport`` adapts a ``QuicStream`` to the data plane's ``Transport``
protocol, so encrypted data channels can run over QUIC streams when no TCP
path exists.
"""

from __future__ import annotations

import struct

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from peerd.errors import PeerLost, ProtocolError
from peerd.quic import STREAM_HIGH_WATER, Address, QuicConn, QuicStream

LENGTH = struct.Struct(">H")
PIPE_QUEUE = 256  # datagrams waiting for the pipe before new ones are dropped
FIRST_DATAGRAM_TIMEOUT = 10.0


class _Deframer:
    """Splits ``u16 length | datagram`` records out of a byte stream (pure)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(self._buf)
            if len(self._buf) < LENGTH.size + n:
                break
            out.append(bytes(self._buf[LENGTH.size:LENGTH.size + n]))
            del self._buf[:LENGTH.size + n]
        return out


class PipeEndpoint:
    """Carries the datagrams of one ``QuicConn`` over ``stream``."""

    def __init__(self, stream: QuicStream, addr: Address) -> None:
        self.stream = stream
        self.addr = addr  # a stand-in address; the conn never sends to it
        self._conns: dict[bytes, QuicConn] = {}
        self._out_send, self._out = trio.open_memory_channel[bytes](PIPE_QUEUE)
        self._deframer = _Deframer()
        self._pending: list[bytes] = []
        self.conn: QuicConn | None = None
        self.dropped = 0

    # -- DatagramSink
    def send_raw(self, data: bytes, addr: Address) -> None:
        try:
            self._out_send.send_nowait(LENGTH.pack(len(data)) + data)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.ClosedResourceError:
            pass

    def _forget(self, conn: QuicConn) -> None:
        self._conns.clear()
        self._out_send.close()

    # -- building the connection
    def start_client(self, nursery: trio.Nursery, config: QuicConfiguration) -> QuicConn:
        quic = QuicConnection(configuration=config)
        conn = self._attach(nursery, quic)
        quic.connect(self.addr, now=trio.current_time())
        conn.transmit()
        return conn

    async def start_server(self, nursery: trio.Nursery, config: QuicConfiguration) -> QuicConn:
        """Wait for the client's first datagram and answer it."""
        with trio.fail_after(FIRST_DATAGRAM_TIMEOUT):
            while not self._pending:
                data = await self.stream.receive_some()
                if not data:
                    raise PeerLost([self.addr[0]], "relay circuit closed before QUIC started")
                self._pending.extend(self._deframer.feed(data))
        try:
            header = pull_quic_header(Buffer(data=self._pending[0]), host_cid_length=8)
        except Exception:  # any parse failure of the first packet
            raise ProtocolError("relay circuit did not start with a QUIC Initial") from None
        if header.packet_type != QuicPacketType.INITIAL:
            raise ProtocolError("relay circuit did not start with a QUIC Initial")
        quic = QuicConnection(configuration=config,
                              original_destination_connection_id=header.destination_cid)
        return self._attach(nursery, quic)

    def _attach(self, nursery: trio.Nursery, quic: QuicConnection) -> QuicConn:
        conn = QuicConn(self, quic, self.addr)
        self.conn = conn
        self._conns[quic.host_cid] = conn
        nursery.start_soon(conn.run_timer)
        nursery.start_soon(self._pump, conn)
        return conn

    # -- moving bytes
    async def _pump(self, conn: QuicConn) -> None:
        self._reason = "relay circuit closed"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, nursery.cancel_scope)
                nursery.start_soon(self._read, conn, nursery.cancel_scope)
                await conn.closed_event.wait()
                nursery.cancel_scope.cancel()
        finally:
            conn._mark_closed(self._reason)
            self.stream.reset()

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            async for record in self._out:
                batch = [record]
                while len(batch) < 64:
                    try:
                        batch.append(self._out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self.stream.send(b"".join(batch))
        except PeerLost as exc:
            self._reason = f"relay circuit lost: {exc}"
        scope.cancel()

    def _feed(self, conn: QuicConn, datagrams: list[bytes]) -> bool:
        """Hand ``datagrams`` to ``conn``; True when that ended the circuit."""
        for data in datagrams:
            if not conn.datagram_received(data, self.addr, trio.current_time()):
                return True  # closed with its reason; ``_pump`` ends the circuit
        if datagrams:
            conn.flush()
        return False

    async def _read(self, conn: QuicConn, scope: trio.CancelScope) -> None:
        pending, self._pending = self._pending, []
        try:
            while not self._feed(conn, pending):
                chunk = await self.stream.receive_some()
                if not chunk:
                    break
                pending = self._deframer.feed(chunk)
        except PeerLost as exc:
            self._reason = f"relay circuit lost: {exc}"
        scope.cancel()


class StreamTransport:
    """``peerd.datasock.Transport`` over one QUIC stream."""

    def __init__(self, stream: QuicStream) -> None:
        self.stream = stream
        self._buf = memoryview(b"")

    async def send_all(self, data: memoryview | bytes) -> None:
        try:
            await self.stream.send(bytes(data))
        except PeerLost as exc:  # the data channel's failure type for a broken transport
            raise trio.BrokenResourceError(str(exc)) from None

    async def recv_into(self, view: memoryview) -> int:
        if not self._buf:
            try:
                self._buf = memoryview(await self.stream.receive_some())
            except PeerLost as exc:
                raise trio.BrokenResourceError(str(exc)) from None
            if not self._buf:
                return 0
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self.stream.reset()

    def buffer_sizes(self) -> tuple[int, int]:
        return (STREAM_HIGH_WATER, STREAM_HIGH_WATER)
