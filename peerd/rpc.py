"""Request/response and one-way RPC over QUIC streams of authenticated sessions.

Each call uses its own bidirectional stream: request frame, then one response
frame (none for one-way messages). Deadlines travel with the request so the
server stops work the caller has given up on; a caller's cancellation resets
the stream, which cancels the remote handler. Remote failures come back as
``RemoteError`` carrying the remote error's type name.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from peerd.errors import PeerdError, PeerLost, ProtocolError, RemoteError, Timeout
from peerd.identity import PeerId
from peerd.log import event
from peerd.quic import QuicStream
from peerd.wire import Limits, decode_untrusted, encode, message

log = logging.getLogger("peerd.rpc")

Handler = Callable[[PeerId, bytes], Awaitable[bytes]]

DEFAULT_CALL_TIMEOUT = 30.0


@message(20)
@dataclass(frozen=True)
class RpcRequest:
    method: str
    deadline_ms: int
    oneway: bool
    payload: bytes


@message(21)
@dataclass(frozen=True)
class RpcResponse:
    ok: bool
    payload: bytes
    error_kind: str
    error_message: str


@dataclass(frozen=True)
class RpcLimits:
    """Per-peer bounds on what a peer may make this node do."""

    max_message: int = 16 * 1024 * 1024
    max_concurrent_calls: int = 64

    @property
    def wire(self) -> Limits:
        return Limits(max_frame=self.max_message + 1024, max_bin=self.max_message)


class RpcRegistry:
    """Method name -> handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, method: str, handler: Handler) -> None:
        if method in self._handlers:
            raise ValueError(f"RPC method {method!r} is already registered")
        self._handlers[method] = handler

    def unregister(self, method: str) -> None:
        self._handlers.pop(method, None)

    def get(self, method: str) -> Handler | None:
        return self._handlers.get(method)


async def call_on_stream(
    stream: QuicStream, peer: PeerId, method: str, payload: bytes, timeout: float,
    limits: RpcLimits, oneway: bool = False,
) -> bytes:
    """Client side of one call on a fresh stream."""
    if len(payload) > limits.max_message:
        raise ProtocolError(f"RPC payload of {len(payload)} bytes exceeds {limits.max_message}")
    done = False
    try:
        with trio.fail_after(timeout):
            req = RpcRequest(method, int(timeout * 1000), oneway, payload)
            await stream.send_frame(encode(req), end=True)
            if oneway:
                done = True
                return b""
            body = await stream.receive_frame(limits.wire)
            done = True
    except trio.TooSlowError:
        raise Timeout(f"RPC {method} to {peer.short} timed out after {timeout:g}s") from None
    finally:
        if done:
            stream.finish()
        else:
            stream.reset()
    resp = decode_untrusted(body, limits.wire, expect=RpcResponse)
    if not resp.ok:
        raise RemoteError(resp.error_kind, resp.error_message)
    return resp.payload


async def serve_stream(
    stream: QuicStream, peer: PeerId, registry: RpcRegistry, limits: RpcLimits,
    slots: trio.CapacityLimiter,
) -> None:
    """Server side: read one request, run its handler, answer. Never raises."""
    try:
        with trio.move_on_after(10.0):  # a request must arrive promptly once its stream opens
            body = await stream.receive_frame(limits.wire)
        req = decode_untrusted(body, limits.wire, expect=RpcRequest)
    except (ProtocolError, PeerLost, UnboundLocalError) as exc:
        event(log, "rpc.bad_request", logging.DEBUG, peer=peer.short, error=exc)
        stream.reset(3)
        raise ProtocolError(f"bad RPC request from {peer.short}") from None
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        await _respond(stream, req, RpcResponse(False, b"", "Busy", "too many concurrent calls"))
        return
    try:
        await _run(stream, peer, req, registry)
    finally:
        slots.release()


async def _run(stream: QuicStream, peer: PeerId, req: RpcRequest, registry: RpcRegistry) -> None:
    handler = registry.get(req.method)
    if handler is None:
        await _respond(stream, req, RpcResponse(False, b"", "NoSuchMethod", req.method))
        return
    resp: RpcResponse | None = None
    async with trio.open_nursery() as nursery:
        # The caller resets the stream when it gives up: stop the handler then.
        nursery.start_soon(_cancel_on_reset, stream, nursery.cancel_scope)
        with trio.move_on_after(max(req.deadline_ms, 1) / 1000):
            try:
                resp = RpcResponse(True, await handler(peer, req.payload), "", "")
            except PeerdError as exc:
                resp = RpcResponse(False, b"", type(exc).__name__, str(exc))
            except Exception as exc:
                event(log, "rpc.handler_crashed", logging.ERROR, method=req.method,
                      error=repr(exc))
                resp = RpcResponse(False, b"", "InternalError", type(exc).__name__)
        nursery.cancel_scope.cancel()
    if resp is not None:
        await _respond(stream, req, resp)


async def _cancel_on_reset(stream: QuicStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some():
            pass  # the request was complete; extra bytes are ignored
        await trio.sleep_forever()
    except (PeerLost, ProtocolError):
        scope.cancel()


async def _respond(stream: QuicStream, req: RpcRequest, resp: RpcResponse) -> None:
    if req.oneway:
        return
    try:
        await stream.send_frame(encode(resp), end=True)
        stream.finish()
    except PeerLost:
        pass  # the caller left; nobody is waiting for this answer
