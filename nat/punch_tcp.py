"""TCP hole punching by simultaneous open from the listening port (trio).

Both ends ``connect()`` from the port they listen on (``SO_REUSEADDR`` +
``SO_REUSEPORT`` on every socket bound to it). Each SYN opens its own NAT's
mapping; when the SYNs cross, Linux completes one connection that both
``connect()`` calls return. A SYN that arrives before the remote mapping exists
is dropped by the remote router, and the kernel's SYN retransmission tries
again. Each side then sends the 16-byte session token and checks the peer's,
so a stray connection is never taken for the peer.
"""

from __future__ import annotations

import errno
import socket as pysocket

import trio

from nat.endpoint import Endpoint
from nat.punch import Dial

RETRY_AFTER_ERROR = 0.1  # a refused/unreachable candidate is retried, bounded by the attempt


def reuse_socket(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM)
    sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
    sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEPORT, 1)
    return sock


class TcpPuncher:
    def __init__(self, port: int, token: bytes, attempt_timeout: float) -> None:
        self.port = port
        self.token = token
        self.attempt_timeout = attempt_timeout
        self.stream: trio.SocketStream | None = None
        self.connect_errors: list[str] = []

    async def listen(self, found: trio.MemorySendChannel[Endpoint]) -> None:
        """Accept on the shared port too: a peer that can reach us outright
        arrives here instead of through the simultaneous open."""
        sock = reuse_socket(self.port)
        await sock.bind(("0.0.0.0", self.port))
        sock.listen(16)
        async with found:
            with sock:
                while True:
                    conn, addr = await sock.accept()
                    await self._verify(trio.SocketStream(conn), Endpoint(addr[0], addr[1]), found)

    async def dial(self, action: Dial, found: trio.MemorySendChannel[Endpoint]) -> None:
        async with found, trio.open_nursery() as nursery:
            for target in action.targets:
                nursery.start_soon(self._connect, target, found.clone())

    async def _connect(self, target: Endpoint, found: trio.MemorySendChannel[Endpoint]) -> None:
        async with found:
            with trio.move_on_after(self.attempt_timeout):
                while self.stream is None:
                    sock = reuse_socket(self.port)
                    await sock.bind(("0.0.0.0", self.port))
                    try:
                        await sock.connect(target.as_tuple())
                    except OSError as exc:
                        sock.close()
                        name = errno.errorcode.get(exc.errno or 0, "?")
                        self.connect_errors.append(f"{target}: {name}")
                        await trio.sleep(RETRY_AFTER_ERROR)
                        continue
                    await self._verify(trio.SocketStream(sock), target, found)
                    return

    async def _verify(self, stream: trio.SocketStream, remote: Endpoint,
                      found: trio.MemorySendChannel[Endpoint]) -> None:
        try:
            with trio.fail_after(self.attempt_timeout):
                await stream.send_all(self.token)
                got = b""
                while len(got) < len(self.token):
                    chunk = await stream.receive_some(len(self.token) - len(got))
                    if not chunk:
                        break
                    got += chunk
        except (trio.TooSlowError, trio.BrokenResourceError, OSError):
            got = b""
        if got != self.token or self.stream is not None:
            await stream.aclose()
            return
        self.stream = stream
        await found.send(remote)
