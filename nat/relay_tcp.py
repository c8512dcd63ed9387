"""A TCP circuit relay driven by the ``nat.relay.Relay`` policy core (trio).

Two peers that cannot reach each other both connect to the relay and send
``RelayJoin`` with the same 16-byte session id. The relay asks its policy core
for a circuit; on success both get ``RelayStatus(ok=True)`` and from then on the
relay copies raw bytes both ways, pacing every chunk by the core's verdict and
closing the circuit when the core refuses (lifetime or byte cap) or either
connection breaks; a clean end of input is passed on as a half-close. The relay
never interprets the payload: the two ends run their own authenticated,
encrypted protocol through it. A client sends nothing after its join until
it has read the relay's status.

The node's own relay will carry circuits over QUIC streams with the same core;
this driver serves the lab and any TCP-only deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from nat.framed import FramedStream, receive_one
from nat.relay import Forward, Opened, Relay, RelayLimits
from peerd.errors import ProtocolError, RemoteError
from peerd.wire import encode_frame, message

RELAY_VERSION = 1
JOIN_TIMEOUT = 10.0  # how long a first peer may wait for its partner
MAX_PENDING = 64  # unpaired joins held at once
CHUNK = 16 * 1024


@message(703)
@dataclass(frozen=True)
class RelayJoin:
    version: int
    session: bytes
    peer: str

    def __post_init__(self) -> None:
        if self.version != RELAY_VERSION:
            raise ValueError(f"relay version {self.version} unsupported")
        if len(self.session) != 16 or not 1 <= len(self.peer) <= 128:
            raise ValueError("bad session or peer")


@message(704)
@dataclass(frozen=True)
class RelayStatus:
    ok: bool
    reason: str


@dataclass
class _Waiting:
    peer: str
    framed: FramedStream
    paired: trio.Event
    done: trio.Event


class TcpRelay:
    """Serve circuits on a listening socket; ``statistics()`` is the core's."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.core = Relay(limits, trio.current_time())
        self._waiting: dict[bytes, _Waiting] = {}

    async def serve(self, port: int, host: str = "0.0.0.0", *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        task_status.started(bound)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        framed = FramedStream(stream)
        try:
            with trio.fail_after(JOIN_TIMEOUT):
                join = await receive_one(stream)
            if not isinstance(join, RelayJoin):
                raise ProtocolError("expected RelayJoin")
            await self._pair(join, framed)
        except (ProtocolError, trio.TooSlowError, trio.EndOfChannel, trio.BrokenResourceError,
                trio.ClosedResourceError):
            pass  # a misbehaving or vanished client only loses its own connection
        finally:
            await stream.aclose()

    async def _pair(self, join: RelayJoin, framed: FramedStream) -> None:
        first = self._waiting.get(join.session)
        if first is None:
            if len(self._waiting) >= MAX_PENDING:
                await framed.send(RelayStatus(False, "too many pending joins"))
                return
            me = _Waiting(join.peer, framed, trio.Event(), trio.Event())
            self._waiting[join.session] = me
            try:
                with trio.fail_after(JOIN_TIMEOUT):
                    await me.paired.wait()
                await me.done.wait()  # the second handler owns the circuit
            finally:
                self._waiting.pop(join.session, None)
            return
        del self._waiting[join.session]
        first.paired.set()
        try:
            await self._circuit(first.peer, first.framed, join.peer, framed)
        finally:
            first.done.set()

    async def _circuit(self, a: str, fa: FramedStream, b: str, fb: FramedStream) -> None:
        verdict = self.core.open(a, b, trio.current_time())
        if not isinstance(verdict, Opened):
            for f in (fa, fb):
                await f.send(RelayStatus(False, verdict.reason.value))
            return
        cid = verdict.circuit
        try:
            for f in (fa, fb):
                await f.send(RelayStatus(True, ""))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, cid, fa, fb.stream, nursery.cancel_scope)
                nursery.start_soon(self._pump, cid, fb, fa.stream, nursery.cancel_scope)
        finally:
            self.core.close(cid)

    async def _pump(self, cid: int, src: FramedStream, dst: trio.abc.Stream,
                    scope: trio.CancelScope) -> None:
        """Copy one direction. End of input half-closes the other side, so
        bytes still in flight are delivered; a refusal or a broken
        connection ends the whole circuit."""
        try:
            while True:
                data = await src.stream.receive_some(CHUNK)
                if not data:
                    if isinstance(dst, trio.abc.HalfCloseableStream):
                        await dst.send_eof()
                    return
                verdict = self.core.forward(cid, len(data), trio.current_time())
                if not isinstance(verdict, Forward):
                    break
                await trio.sleep(verdict.delay)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def open_circuit(host: str, port: int, session: bytes, peer: str) -> trio.SocketStream:
    """Connect to a relay and wait until the partner joins the same session.

    Returns the raw stream, positioned right after the relay's status: every
    later byte is the partner's. Raises ``RemoteError`` when the relay refuses."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(encode_frame(RelayJoin(RELAY_VERSION, session, peer)))
        status = await receive_one(stream)
        if not isinstance(status, RelayStatus):
            raise ProtocolError("expected RelayStatus")
        if not status.ok:
            raise RemoteError("RelayRefused", status.reason)
    except BaseException:
        await stream.aclose()
        raise
    return stream
