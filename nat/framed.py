"""Typed wire messages over any trio byte stream (thin driver).

Used for the punch signalling that travels through a relay circuit. Frames are
bounded and decoded through the one untrusted door (``decode_untrusted``).
"""

from __future__ import annotations

from typing import Any

import trio

from peerd.errors import ProtocolError
from peerd.wire import FRAME_HEADER, FrameDecoder, Limits, decode_untrusted, encode_frame

SIGNAL_LIMITS = Limits(max_frame=64 * 1024, max_items=256, max_str=1024, max_bin=4096)
READ_CHUNK = 65536


class FramedStream:
    def __init__(self, stream: trio.abc.Stream, limits: Limits = SIGNAL_LIMITS) -> None:
        self.stream = stream
        self._limits = limits
        self._decoder = FrameDecoder(limits)
        self._pending: list[bytes] = []
        self._send_lock = trio.Lock()

    async def send(self, msg: Any) -> None:
        async with self._send_lock:
            await self.stream.send_all(encode_frame(msg))

    async def receive(self) -> Any:
        """The next message; ``trio.EndOfChannel`` when the peer closed,
        ``ProtocolError`` on garbage."""
        while not self._pending:
            data = await self.stream.receive_some(READ_CHUNK)
            if not data:
                raise trio.EndOfChannel
            self._pending.extend(self._decoder.feed(bytes(data)))
        return decode_untrusted(self._pending.pop(0), self._limits)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise trio.EndOfChannel
        buf += chunk
    return bytes(buf)


async def receive_one(stream: trio.abc.Stream, limits: Limits = SIGNAL_LIMITS) -> Any:
    """Read exactly one frame and nothing more, so the stream can change
    hands afterwards (e.g. a relay circuit that becomes a raw byte pipe)."""
    (n,) = FRAME_HEADER.unpack(await _receive_exactly(stream, FRAME_HEADER.size))
    if n > limits.max_frame:
        raise ProtocolError(f"frame of {n} bytes exceeds limit {limits.max_frame}")
    return decode_untrusted(await _receive_exactly(stream, n), limits)
