"""Trio driver of one keyed data connection: framed messages over sealed records.

A message is one HEAD record (caller's header + payload length) followed by
PAYLOAD records of at most ``max_record`` bytes each; CLOSE ends the stream
cleanly. The driver reads each record body into its own buffer and decrypts it
straight into the caller's destination, so a payload is touched once by the
kernel and once by the cipher on each side.

With ``native`` (``peerd.datapump`` built) a message's records are sealed
and written, and a payload's records read and opened, by one C call per
message, or per socket-full where the socket would block, instead of a
Python round per record.

With ``offload`` (where cores are to spare) a large message is sent, and a
large payload received (``receive_payload``), by one worker thread that does
the socket I/O and the cipher for all its records: both release the GIL, so
the channels of a node move bytes in parallel and the event loop only
dispatches messages. The loop itself still reads every head, and small
messages stay on it, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import mmap
import os
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import trio

from peerd import datapump
from peerd.dataproto import Kind, encode_head, parse_head
from peerd.datapump import ReceiveJob, SendJob, Status
from peerd.datasock import (
    ChannelStats,
    SocketTransport,
    Transport,
    as_bytes_view,
    hop,
    read_exactly_blocking,
    recv_exactly,
    run_crypto,
    set_notsent_lowat,
    tune_socket,
    wait_fd,
    write_all_blocking,
)
from peerd.errors import PeerLost, ProtocolError
from peerd.record import HEADER, TAG_SIZE, RecordOpener, RecordSealer, record_size
from peerd.writegate import WriteGate

__all__ = [
    "DEFAULT_MAX_MESSAGE", "DEFAULT_SOCKET_BUFFER", "ChannelStats", "DataChannel",
    "SocketTransport", "Transport", "as_bytes_view", "lazy_buffer", "recv_exactly", "tune_socket",
]

DEFAULT_SOCKET_BUFFER: Final = 8 * 1024 * 1024
DEFAULT_MAX_MESSAGE: Final = 1 << 30
# The least unsent bytes ``DataChannel.limit_unsent`` leaves a socket: the
# kernel wakes a writer once half of them are left, and a writer that wakes
# late leaves the link idle.
MIN_UNSENT: Final = 32 * 1024
# Below this many bytes a thread hop costs more than the work it would offload.
OFFLOAD_MIN: Final = 64 * 1024
# Worker threads only pay off when a core is free to run them: measured on a
# busy 2-core machine, the hand-off and cross-core cache traffic cost ~60% more
# CPU per byte than inline crypto, so offloading is opt-in.
_HEAD_SLACK: Final = record_size(0xFFFF + 10)

def lazy_buffer(size: int) -> memoryview:
    """A zeroed, writable buffer whose pages become resident only when written.

    A channel's record buffers are sized for the largest record, but a
    channel that only receives never writes its send buffer, and one carrying
    small messages touches a page or two: a node with dozens of channels
    would otherwise hold megabytes per channel (bytearray zero-fills eagerly).
    """
    return memoryview(mmap.mmap(-1, size))


@contextmanager
def _landing(dest: memoryview | None, gate: WriteGate | None, off: int, n: int,
             scratch: memoryview | None) -> Iterator[memoryview]:
    """Where the payload bytes ``[off, off + n)`` are decrypted: their place
    in ``dest`` while ``gate`` (if any) admits writes (held for the
    decryption), else ``scratch``, to be dropped."""
    if dest is None:
        assert scratch is not None
        yield scratch[:n]
    elif gate is None:
        yield dest[off : off + n]
    elif gate.enter():
        try:
            yield dest[off : off + n]
        finally:
            gate.leave()
    else:
        assert scratch is not None
        yield scratch[:n]


class DataChannel:
    """One authenticated, encrypted data connection to ``peer``.

    ``send`` may be called from several tasks (they queue); receiving is for
    one task at a time. Every connection failure surfaces as ``PeerLost``,
    every malformed or unauthentic byte as ``ProtocolError``. A channel built
    with ``sealer=opener=None`` sends plaintext: benchmarks only, never reachable
    from dial/listen.
    """

    def __init__(
        self,
        transport: Transport,
        sealer: RecordSealer | None,
        opener: RecordOpener | None,
        peer: str,
        token: bytes = b"",
        max_record: int = 1024 * 1024,
        max_message: int = DEFAULT_MAX_MESSAGE,
        offload: bool = False,
        native: bool = False,
        unsent_bound: int = 0,
    ) -> None:
        self.peer = peer
        self._offload_min = OFFLOAD_MIN if offload else 1 << 62
        self.token = token
        self._t = transport
        # Whole messages on I/O threads, and the native record loops, need a
        # socket (and records to seal and open).
        sock = (transport if isinstance(transport, SocketTransport)
                and sealer is not None and opener is not None else None)
        self._sock = sock if offload else None
        self._pump = sock if native else None
        # The socket's unsent-bytes bound as configured (0: the kernel's
        # default, left alone) and as now set (``limit_unsent``).
        self._unsent_socket = transport if isinstance(transport, SocketTransport) else None
        self._unsent_bound = self._unsent = unsent_bound
        # Set on abort: a native sender blocked on the socket looks at it.
        self._stop = bytearray(1)
        self._io_threads = 0  # worker threads using the socket; it closes after the last
        self._sealer = sealer
        self._opener = opener
        self._max_record = max_record
        self._max_message = max_message
        self._send_lock = trio.StrictFIFOLock()
        self._wbuf = lazy_buffer(record_size(max_record) + _HEAD_SLACK)
        self._rbuf = lazy_buffer(record_size(max_record))
        self._hdr = memoryview(bytearray(HEADER.size))
        self._pending = 0  # plaintext length of a payload record read but not yet opened
        self._payload_left = 0
        self._closed = False
        self._rx_raw = 0  # every byte taken from the transport, for cancel safety
        self._sent = [0, 0, 0]  # bytes, records, messages
        self._recv = [0, 0, 0]
        try:
            self._bufs = transport.buffer_sizes()
        except OSError:
            self._bufs = (0, 0)

    @property
    def max_record(self) -> int:
        return self._max_record

    @property
    def native(self) -> bool:
        """Whether the next message goes through the native record loops."""
        return self._pump is not None and datapump.available()

    @property
    def cipher(self) -> str:
        """The record cipher's name ("" for a plaintext benchmark channel)."""
        return self._sealer.cipher if self._sealer is not None else ""

    @property
    def sending(self) -> bool:
        """Whether a send holds (or waits for) this channel."""
        return self._send_lock.locked()

    # ------------------------------------------------------------ sending

    def limit_unsent(self, limit: int) -> None:
        """Hold about ``limit`` unsent bytes in the socket from now on (between
        ``MIN_UNSENT`` and the bound the channel was built with; a channel
        without a bound keeps the kernel's default). Rounded down to a power of
        two, so a link that paces its channels changes it seldom."""
        if not self._unsent_bound or self._unsent_socket is None:
            return
        rounded = 1 << (max(limit, 1).bit_length() - 1)
        want = max(MIN_UNSENT, min(self._unsent_bound, rounded))
        if want != self._unsent:
            try:
                set_notsent_lowat(self._unsent_socket.sock, want)
            except OSError:
                return  # closed under us: its failure surfaces where it is used
            self._unsent = want

    @property
    def unsent_limit(self) -> int:
        """The unsent bytes the socket holds at most now (0: the kernel's default)."""
        return self._unsent

    def _lost(self, exc: BaseException, what: str) -> PeerLost:
        return PeerLost([self.peer], f"data channel {what}: {exc!r}")

    def _seal(self, kind: int, plain: memoryview, at: int) -> int:
        if self._sealer is None:
            HEADER.pack_into(self._wbuf, at, kind, len(plain))
            return HEADER.size
        return self._sealer.seal_into(kind, plain, self._wbuf[at:])

    async def _write(self, data: memoryview) -> None:
        try:
            await self._t.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._lost(exc, "send failed") from None
        self._sent[0] += len(data)

    async def send(self, header: bytes, payload: Any = b"") -> None:
        """Send one message; returns once every byte is handed to the kernel,
        so the caller may reuse ``payload`` afterwards."""
        view = as_bytes_view(payload)
        if len(view) > self._max_message:
            raise ValueError(f"payload of {len(view)} bytes exceeds {self._max_message}")
        head = memoryview(encode_head(header, len(view)))
        async with self._send_lock:
            if self._closed:
                raise PeerLost([self.peer], "data channel closed")
            try:
                await self._send_locked(head, view)
            except BaseException:  # a half-written message cannot be resumed
                self.abort()
                raise

    async def _send_locked(self, head: memoryview, view: memoryview) -> None:
        if self._pump is not None and datapump.available():
            await self._send_native(self._pump, head, view)
            return
        if self._sock is not None and len(view) >= self._offload_min:
            await self._in_thread(self._send_sync, self._sock.fileno(), head, view)
            return
        for data in self._writes(head, view):
            await self._write(data)

    async def _send_native(self, sock: SocketTransport, head: memoryview,
                           view: memoryview) -> None:
        assert self._sealer is not None
        await trio.lowlevel.checkpoint_if_cancelled()
        job = SendJob(self._sealer, Kind.PAYLOAD, view, self._wbuf,
                      self._sealer.seal_into(Kind.HEAD, head, self._wbuf))
        fd = sock.fileno()
        if self._sock is not None and len(view) >= self._offload_min:
            await self._in_thread(self._pump_send, job, fd, True)
        else:
            while not self._pump_send(job, fd, False):
                try:
                    await trio.lowlevel.wait_writable(sock.sock)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._lost(exc, "send failed") from None
        self._sent[1] += job.records + 1
        self._sent[2] += 1

    def _pump_send(self, job: SendJob, fd: int, block: bool) -> bool:
        """Write on natively; True once the message is written, False where
        the socket is full (only without ``block``)."""
        p = job.step(fd, block, self._stop)
        self._sent[0] += p.nbytes
        if p.status == Status.DONE:
            return True
        if p.status == Status.AGAIN:
            return False
        exc = (BrokenPipeError("data channel stopped") if p.status == Status.STOPPED
               else OSError(p.errno, os.strerror(p.errno)))
        raise self._lost(exc, "send failed")

    def _send_sync(self, fd: int, head: memoryview, view: memoryview) -> None:
        """``_send_locked`` on an I/O thread."""
        for data in self._writes(head, view):
            self._write_sync(fd, data)

    def _writes(self, head: memoryview, view: memoryview) -> Iterator[memoryview]:
        """The message as the byte strings to write, in order: one per record
        (the head shares the first payload record's). Each must be written
        before the next is taken: they share the channel's write buffer."""
        pos = self._seal(Kind.HEAD, head, 0)
        if self._sealer is None:
            self._wbuf[pos : pos + len(head)] = head
            pos += len(head)
        off = 0
        while off < len(view):
            n = min(self._max_record, len(view) - off)
            chunk = view[off : off + n]
            if pos + record_size(n) > len(self._wbuf):
                yield self._wbuf[:pos]
                pos = 0
            pos += self._seal(Kind.PAYLOAD, chunk, pos)
            if self._sealer is None:  # plaintext: the payload goes from the caller's buffer
                yield self._wbuf[:pos]
                yield chunk
                pos = 0
            off += n
            self._sent[1] += 1
        if pos:
            yield self._wbuf[:pos]
        self._sent[1] += 1
        self._sent[2] += 1

    def _write_sync(self, fd: int, data: memoryview) -> None:
        try:
            write_all_blocking(fd, data, self._is_closed)
        except OSError as exc:
            raise self._lost(exc, "send failed") from None
        self._sent[0] += len(data)

    def _is_closed(self) -> bool:
        return self._closed

    async def _in_thread(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn`` (blocking I/O on this channel's socket) on a worker thread.
        A cancelled caller stops it by closing the channel, and waits for it:
        the thread may be writing into the caller's buffer."""
        self._io_threads += 1
        try:
            await hop(fn, *args, on_cancel=self.abort)
        finally:
            self._io_threads -= 1
            if self._closed and not self._io_threads:
                self._t.close()

    # ------------------------------------------------------------ receiving

    async def _recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = await self._t.recv_into(view[got:])
            if n == 0:
                raise EOFError(got)
            got += n
            self._rx_raw += n

    async def _read_header(self) -> tuple[int, int]:
        try:
            await self._recv_exact(self._hdr)
        except EOFError as exc:
            raise self._eof_in_header(exc) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._lost(exc, "receive failed") from None
        return self._parse_header()

    def _eof_in_header(self, exc: EOFError) -> PeerLost:
        what = "ended without close" if exc.args[0] == 0 else "truncated inside a header"
        return PeerLost([self.peer], f"data channel {what}")

    def _eof_in_record(self, exc: EOFError) -> PeerLost:
        return PeerLost([self.peer], "data channel truncated inside a record")

    def _parse_header(self) -> tuple[int, int]:
        self._recv[1] += 1
        self._recv[0] += HEADER.size
        if self._opener is not None:
            return self._opener.parse_header(self._hdr)
        kind, n = HEADER.unpack(self._hdr)
        if n > self._max_record:
            raise ProtocolError("oversized plaintext record")
        return kind, n

    async def _read_body(self, n: int) -> memoryview:
        body = self._rbuf[: n + (TAG_SIZE if self._opener is not None else 0)]
        await self._fill(body)
        return body

    async def _fill(self, view: memoryview) -> None:
        try:
            await self._recv_exact(view)
        except EOFError as exc:
            raise self._eof_in_record(exc) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._lost(exc, "receive failed") from None
        self._recv[0] += len(view)

    def _open(self, kind: int, body: memoryview, out: memoryview) -> None:
        assert self._opener is not None
        self._opener.open_into(kind, body, out)

    async def _read_small(self, kind: int, n: int) -> bytes:
        body = await self._read_body(n)
        if self._opener is None:
            return bytes(body)
        out = bytearray(n)
        self._open(kind, body, memoryview(out))
        return bytes(out)

    async def receive_head(self) -> tuple[bytes, int]:
        """Wait for the next message; returns ``(header, payload length)``.
        Its payload must then be drained with ``next_payload_record`` and
        ``read_payload_into`` before the next call."""
        if self._closed:
            raise PeerLost([self.peer], "data channel closed")
        if self._payload_left:
            raise RuntimeError("previous message payload not drained")
        start = self._rx_raw
        try:
            kind, n = await self._read_header()
            if kind == Kind.CLOSE:
                await self._read_small(kind, n)
                raise PeerLost([self.peer], "data channel closed by peer")
            if kind != Kind.HEAD or n > _HEAD_SLACK:
                raise ProtocolError(f"expected a message head, got record kind {kind}")
            header, plen = parse_head(await self._read_small(kind, n), self._max_message)
        except trio.Cancelled:
            if self._rx_raw != start:  # cancelled mid-record: the stream is out of step
                self.abort()
            raise
        except BaseException:
            self.abort()
            raise
        self._payload_left = plen
        self._recv[2] += 1
        return header, plen

    async def next_payload_record(self) -> int:
        """Read the next payload record of the current message; returns its
        plaintext length, to be placed with ``read_payload_into``."""
        if self._closed:
            raise PeerLost([self.peer], "data channel closed")
        if self._pending or not self._payload_left:
            raise RuntimeError("no payload record expected")
        try:
            kind, n = await self._read_header()
            self._check_payload_record(kind, n)
            if self._opener is not None:
                await self._read_body(n)
        except BaseException:  # mid-message: nothing after this can be trusted
            self.abort()
            raise
        self._pending = n
        return n

    def _check_payload_record(self, kind: int, n: int) -> None:
        if kind != Kind.PAYLOAD or not 0 < n <= self._payload_left:
            raise ProtocolError(f"unexpected record kind {kind} ({n} bytes) in a payload")

    async def receive_payload(
        self, dest: memoryview | None, gate: WriteGate | None, scratch: memoryview | None
    ) -> None:
        """Read the whole payload of the message from ``receive_head``: each
        record is decrypted into its place in ``dest`` (exactly the payload's
        length) while ``gate`` (if given) admits writes, else into ``scratch``
        (one record's size; needed unless ``dest`` is given without a gate)
        and dropped. With offload a large payload is read by one I/O thread."""
        if self._closed:
            raise PeerLost([self.peer], "data channel closed")
        if self._pending:
            raise RuntimeError("a payload record is pending")
        if self._pump is not None and datapump.available():
            try:
                await self._receive_native(self._pump, dest, gate, scratch)
            except BaseException:  # mid-message: nothing after this can be trusted
                self.abort()
                raise
            return
        if self._sock is not None and self._payload_left >= self._offload_min:
            try:
                await self._in_thread(
                    self._receive_payload_sync, self._sock.fileno(), dest, gate, scratch)
            except BaseException:  # mid-message: nothing after this can be trusted
                self.abort()
                raise
            return
        off = 0
        while self._payload_left:
            n = await self.next_payload_record()
            with _landing(dest, gate, off, n, scratch) as out:
                await self.read_payload_into(out)
            off += n

    async def _receive_native(self, sock: SocketTransport, dest: memoryview | None,
                              gate: WriteGate | None, scratch: memoryview | None) -> None:
        assert self._opener is not None
        job = ReceiveJob(self._opener, Kind.PAYLOAD, self._payload_left, self._hdr, self._rbuf)
        fd = sock.fileno()
        if self._sock is not None and self._payload_left >= self._offload_min:
            await self._in_thread(self._receive_native_sync, job, fd, dest, gate, scratch)
            return
        while not self._pump_receive(job, fd, dest, gate, scratch):
            try:
                await trio.lowlevel.wait_readable(sock.sock)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._lost(exc, "receive failed") from None

    def _receive_native_sync(self, job: ReceiveJob, fd: int, dest: memoryview | None,
                             gate: WriteGate | None, scratch: memoryview | None) -> None:
        """``_receive_native`` on an I/O thread."""
        while not self._pump_receive(job, fd, dest, gate, scratch):
            try:
                wait_fd(fd, select.POLLIN, self._is_closed)
            except OSError as exc:
                raise self._lost(exc, "receive failed") from None

    def _pump_receive(self, job: ReceiveJob, fd: int, dest: memoryview | None,
                      gate: WriteGate | None, scratch: memoryview | None) -> bool:
        """Read on natively as far as the socket has bytes; True once the
        payload is in. Decrypts into ``dest`` only inside ``gate`` (the call
        never blocks, so the gate is held for a bounded time)."""
        admitted = dest is not None and (gate is None or gate.enter())
        try:
            p = job.step(fd, dest if admitted else None, scratch)
        finally:
            if admitted and gate is not None:
                gate.leave()
        self._recv[0] += p.nbytes
        self._recv[1] += p.records
        self._payload_left = job.left
        if p.status == Status.DONE:
            return True
        if p.status == Status.AGAIN:
            return False
        if p.status == Status.EOF:
            if job.mid_record:
                raise self._eof_in_record(EOFError(job.header_bytes))
            raise self._eof_in_header(EOFError(job.header_bytes))
        raise self._lost(OSError(p.errno, os.strerror(p.errno)), "receive failed")

    def _receive_payload_sync(
        self, fd: int, dest: memoryview | None, gate: WriteGate | None,
        scratch: memoryview | None
    ) -> None:
        off = 0
        while self._payload_left:
            self._read_sync(fd, self._hdr, self._eof_in_header)
            kind, n = self._parse_header()
            self._check_payload_record(kind, n)
            body = self._rbuf[: n + TAG_SIZE]
            self._read_sync(fd, body, self._eof_in_record)
            self._recv[0] += len(body)
            with _landing(dest, gate, off, n, scratch) as out:
                self._open(kind, body, out)
            off += n
            self._payload_left -= n

    def _read_sync(self, fd: int, view: memoryview,
                   on_eof: Callable[[EOFError], PeerLost]) -> None:
        try:
            read_exactly_blocking(fd, view, self._is_closed)
        except EOFError as exc:
            raise on_eof(exc) from None
        except OSError as exc:
            raise self._lost(exc, "receive failed") from None

    async def read_payload_into(self, out: memoryview) -> None:
        """Authenticate and decrypt the record from ``next_payload_record``
        into ``out`` (exactly its length)."""
        n = self._pending
        if len(out) != n or not n:
            raise ValueError("destination does not match the pending record")
        try:
            if self._opener is None:
                await self._fill(out)
            elif n >= self._offload_min:
                await run_crypto(self._open, Kind.PAYLOAD, self._rbuf[: n + TAG_SIZE], out)
            else:
                self._open(Kind.PAYLOAD, self._rbuf[: n + TAG_SIZE], out)
        except BaseException:
            self.abort()
            raise
        self._pending = 0
        self._payload_left -= n

    async def receive(self) -> tuple[bytes, bytearray]:
        """The next whole message as ``(header, payload)``."""
        header, plen = await self.receive_head()
        payload = bytearray(plen)
        if plen:
            await self.receive_payload(memoryview(payload), None, None)
        return header, payload

    # ------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Send a CLOSE record if no send is in flight, then close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._send_lock.locked():
                with trio.move_on_after(1.0) as scope:
                    scope.shield = True
                    pos = self._seal(Kind.CLOSE, memoryview(b""), 0)
                    await self._t.send_all(self._wbuf[:pos])
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._release_socket()

    def abort(self) -> None:
        """Close at once, without a CLOSE record (the peer sees a failure)."""
        self._closed = True
        self._stop[0] = 1
        self._release_socket()

    def _release_socket(self) -> None:
        # An I/O thread still on the socket must not see its descriptor closed
        # (and perhaps reused): shut it down to wake the thread, and let the
        # last one out close it.
        if self._io_threads and self._sock is not None:
            self._sock.shutdown()
        else:
            self._t.close()

    def statistics(self) -> ChannelStats:
        s = self._sealer.statistics() if self._sealer else None
        o = self._opener.statistics() if self._opener else None
        return ChannelStats(
            bytes_sent=self._sent[0],
            bytes_received=self._recv[0],
            records_sent=self._sent[1],
            records_received=self._recv[1],
            rekeys_sent=s.rekeys if s else 0,
            rekeys_received=o.rekeys if o else 0,
            messages_sent=self._sent[2],
            messages_received=self._recv[2],
            sndbuf=self._bufs[0],
            rcvbuf=self._bufs[1],
        )
