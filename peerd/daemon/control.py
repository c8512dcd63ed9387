"""The control socket: a Unix stream socket speaking length-prefixed msgpack.

Only the daemon's own user may connect: the socket lives in a 0700 directory,
is created 0600, and every accepted connection's SO_PEERCRED uid is checked
as well. Each connection reads frames in order (so a segment registered before
a request is known to it), runs requests as concurrent tasks, and is bounded
in in-flight requests and registered segments. When a client goes away its
in-flight operations are cancelled and its segments unmapped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import trio

from peerd.daemon import protocol as p
from peerd.daemon.service import ControlService
from peerd.daemon.shm import (
    Segment,
    SegmentTable,
    ancillary_space,
    fds_ancillary,
    fds_from_ancillary,
)
from peerd.errors import ConfigError, ProtocolError
from peerd.log import event
from peerd.wire import FrameDecoder, decode_untrusted, encode_frame

log = logging.getLogger("peerd.daemon")

RECV_CHUNK = 64 * 1024
STALE_PROBE_TIMEOUT = 1.0


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory 0700 and clear a stale socket file; refuse
    to start when another daemon answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket path {path} exists and is not a socket; "
                          "remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_PROBE_TIMEOUT)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a killed daemon
        return
    finally:
        probe.close()
    raise ConfigError(f"another peerd daemon is already running on {path}; "
                      "stop it first or give this one another --data-dir")


def bind_control_socket(path: Path) -> trio.socket.SocketType:
    prepare_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from its creation, with no window; the
    # bind is synchronous so no other thread creates files meanwhile.
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create control socket {path}: {exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return trio.socket.from_stdlib_socket(sock)


def peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlConnection:
    """One client connection: ordered frame reader, concurrent request tasks."""

    def __init__(self, sock: trio.socket.SocketType, service: ControlService,
                 max_inflight: int) -> None:
        self.sock = sock
        self.service = service
        self.table = SegmentTable()
        self._fds: collections.deque[int] = collections.deque()
        self._send_lock = trio.Lock()
        self._inflight = 0
        self._max_inflight = max_inflight
        self._next_gift = -1  # daemon-made segments get negative ids

    async def send(self, msg: Any, fds: tuple[int, ...] = ()) -> None:
        data = memoryview(encode_frame(msg))
        async with self._send_lock:
            sent = await self.sock.sendmsg([data], fds_ancillary(list(fds))) if fds else 0
            while sent < len(data):
                sent += await self.sock.send(data[sent:])

    async def gift(self, segment: Segment) -> int:
        seg_id, self._next_gift = self._next_gift, self._next_gift - 1
        fd = segment.take_fd()
        try:
            await self.send(p.SegmentGift(seg_id, segment.size), (fd,))
        finally:
            os.close(fd)
        return seg_id

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._read(nursery)
                nursery.cancel_scope.cancel()  # client gone: abandon its operations
        finally:
            self.table.close_all()
            while self._fds:
                os.close(self._fds.popleft())
            self.sock.close()

    async def _read(self, nursery: trio.Nursery) -> None:
        """Read frames until EOF; a malformed frame ends this connection only."""
        decoder = FrameDecoder(p.CONTROL_LIMITS)
        try:
            while True:
                data, anc, flags, _ = await self.sock.recvmsg(RECV_CHUNK, ancillary_space())
                self._fds.extend(fds_from_ancillary(anc))
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError("too many descriptors in one message")
                if not data:
                    return
                for body in decoder.feed(data):
                    await self._dispatch(decode_untrusted(body, p.CONTROL_LIMITS), nursery)
        except ProtocolError as exc:
            event(log, "control.bad_client", logging.WARNING, error=exc)
        except OSError as exc:
            event(log, "control.io_error", logging.DEBUG, error=exc)

    async def _dispatch(self, msg: Any, nursery: trio.Nursery) -> None:
        if isinstance(msg, p.RegisterSegment):
            # Handled inline so that later frames on this connection can use it.
            if not self._fds:
                raise ProtocolError("RegisterSegment without a descriptor")
            try:
                self.table.add(msg.segment, Segment.attach(self._fds.popleft(), msg.size))
            except ProtocolError as exc:
                await self.send(p.CtlError(msg.req_id, "ProtocolError", str(exc), ()))
                return
            await self.send(p.Ok(msg.req_id))
            return
        if self._inflight >= self._max_inflight:
            await self.send(p.CtlError(getattr(msg, "req_id", 0), "Timeout",
                                       f"more than {self._max_inflight} requests in flight", ()))
            return
        self._inflight += 1
        nursery.start_soon(self._run, msg)

    async def _run(self, msg: Any) -> None:
        try:
            reply = await self.service.handle(msg, self)
            await self.send(reply)
        except OSError:
            pass  # client went away; serve() notices on its next read
        finally:
            self._inflight -= 1


async def serve_control(path: Path, service: ControlService, max_clients: int,
                        max_inflight: int,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept clients on ``path`` until cancelled; the socket file is removed on exit."""
    listener = bind_control_socket(path)
    clients = 0
    my_uid = os.geteuid()
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                uid = peer_uid(sock)
                if uid not in (my_uid, 0) or clients >= max_clients:
                    event(log, "control.refused", logging.WARNING, uid=uid, clients=clients)
                    sock.close()
                    continue
                clients += 1
                service.counters["clients_total"] += 1
                service.counters["clients"] = clients

                async def run(conn: ControlConnection) -> None:
                    nonlocal clients
                    try:
                        await conn.serve()
                    finally:
                        clients -= 1
                        service.counters["clients"] = clients
                    # Not on shutdown (cancelled): the node's close tells the peers.
                    await service.client_gone(conn)

                nursery.start_soon(run, ControlConnection(sock, service, max_inflight))
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
