"""The client's end of the control socket: one socket, one reader thread.

Why a thread: the training loop is ordinary blocking Python (torch), async
handles need several operations in flight on one connection, and shared
segments are registered per connection. A single reader thread demultiplexes
replies by ``req_id`` into ``concurrent.futures.Future`` objects; callers send
under a lock and block on their future with a deadline. When the daemon dies
the kernel closes the socket, the reader sees EOF at once and fails every
pending future with ``DaemonUnavailable`` — no call waits for its deadline.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from peerd.daemon import protocol as p
from peerd.daemon.shm import (
    Segment,
    SegmentTable,
    ancillary_space,
    fds_ancillary,
    fds_from_ancillary,
)
from peerd.errors import (
    AuthError,
    ConfigError,
    Evicted,
    PeerdError,
    PeerLost,
    ProtocolError,
    RemoteError,
    Timeout,
)
from peerd.wire import FrameDecoder, decode_untrusted, encode_frame

RECV_CHUNK = 64 * 1024


class DaemonUnavailable(PeerdError):
    """The daemon is not running, went away, or closed this connection."""


def error_from(reply: p.CtlError) -> PeerdError:
    """The local exception for a daemon's error reply."""
    if reply.kind in ("PeerLost", "Evicted"):
        lost = Evicted if reply.kind == "Evicted" else PeerLost
        return lost.restored(reply.peers, reply.message)
    simple: dict[str, type[PeerdError]] = {
        "Timeout": Timeout, "ConfigError": ConfigError, "ProtocolError": ProtocolError,
        "AuthError": AuthError,
    }
    cls = simple.get(reply.kind)
    return cls(reply.message) if cls is not None else RemoteError(reply.kind, reply.message)


class Connection:
    """A connected control socket; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonUnavailable(
                f"no peerd daemon at {self.path} ({exc.strerror}); start one with "
                "`peerd start`, or point PEERD_SOCKET at its control socket") from None
        except PermissionError:
            self._sock.close()
            raise DaemonUnavailable(
                f"permission denied on {self.path}: the control socket belongs to the "
                "daemon's user; run as that user") from None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._failure: PeerdError | None = None
        self.gifts = SegmentTable(max_segments=1 << 20)
        self._reader = threading.Thread(target=self._read_loop, name="peerd-client-reader",
                                        daemon=True)
        self._reader.start()

    # ------------------------------------------------------------ requests

    def request(self, make: Callable[[int], Any], fds: tuple[int, ...] = ()) -> Future[Any]:
        """Send ``make(req_id)`` (with ``fds`` attached); the future gets the reply."""
        fut: Future[Any] = Future()
        with self._state_lock:
            if self._failure is not None:
                raise self._failure
            req_id = next(self._ids)
            self._pending[req_id] = fut
        data = memoryview(encode_frame(make(req_id)))
        try:
            with self._send_lock:
                sent = self._sock.sendmsg([data], fds_ancillary(list(fds))) if fds else 0
                while sent < len(data):
                    sent += self._sock.send(data[sent:])
        except OSError as exc:
            self._fail(DaemonUnavailable(f"peerd daemon at {self.path} is gone ({exc})"))
        return fut

    def call(self, make: Callable[[int], Any], timeout: float | None,
             fds: tuple[int, ...] = ()) -> Any:
        return wait(self.request(make, fds), timeout, self.path)

    # ------------------------------------------------------------ reader

    def _read_loop(self) -> None:
        decoder = FrameDecoder(p.CONTROL_LIMITS)
        fds: collections.deque[int] = collections.deque()
        reason = "closed the connection (it stopped or crashed)"
        try:
            while True:
                data, anc, _flags, _ = self._sock.recvmsg(RECV_CHUNK, ancillary_space())
                fds.extend(fds_from_ancillary(anc))
                if not data:
                    break
                for body in decoder.feed(data):
                    self._deliver(decode_untrusted(body, p.CONTROL_LIMITS), fds)
        except ProtocolError as exc:
            reason = f"sent a malformed reply ({exc})"
        except ConnectionResetError:
            reason = "reset the connection (it stopped or crashed)"
        except OSError as exc:
            reason = f"connection error ({exc})"
        finally:
            while fds:
                os.close(fds.popleft())
        self._fail(DaemonUnavailable(f"peerd daemon at {self.path} {reason}"))

    def _deliver(self, msg: Any, fds: collections.deque[int]) -> None:
        if isinstance(msg, p.SegmentGift):
            if not fds:
                raise ProtocolError("segment gift without a descriptor")
            self.gifts.add(msg.segment, Segment.attach(fds.popleft(), msg.size))
            return
        req_id = getattr(msg, "req_id", None)
        with self._state_lock:
            fut = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
        if fut is None:
            return  # an answer to a request whose caller gave up
        if isinstance(msg, p.CtlError):
            fut.set_exception(error_from(msg))
        else:
            fut.set_result(msg)

    def _fail(self, error: PeerdError) -> None:
        with self._state_lock:
            if self._failure is None:
                self._failure = error
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    # ------------------------------------------------------------ lifetime

    @property
    def alive(self) -> bool:
        return self._failure is None

    def close(self) -> None:
        self._fail(DaemonUnavailable("client closed"))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5.0)
        self._sock.close()
        self.gifts.close_all()


def wait(fut: Future[Any], timeout: float | None, where: Path | str = "daemon") -> Any:
    """The future's reply, or ``Timeout`` after ``timeout`` seconds."""
    try:
        return fut.result(timeout)
    except FutureTimeout:
        raise Timeout(f"no answer from the peerd daemon at {where} within {timeout} s") from None
