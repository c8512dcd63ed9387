"""Socket plumbing of the data plane: the transport seam, socket tuning (buffer
sizes, congestion control), buffers.

``Transport`` is what a ``DataChannel`` needs from a byte stream, so tests can
substitute memory streams; ``SocketTransport`` is the TCP one. Hand-offs to
worker threads live here too (a record's crypto; a whole message's blocking
socket I/O, which polls the non-blocking descriptor itself), since they are
the only other things the channel needs from the runtime; the ring's large
reductions and result copies (``collectives.allreduce``) take the same hop.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import select
import socket
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import trio

from peerd.errors import ConfigError
from peerd.log import event

T = TypeVar("T")

log = logging.getLogger("peerd.datasock")

KEEPALIVE_IDLE: Final = 60
# How often an I/O thread blocked on its socket looks at its stop flag; closing
# the channel shuts the socket down, which wakes it at once anyway.
POLL_TICK_MS: Final = 200

_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("peerd_crypto")


async def hop(fn: Callable[..., T], *args: Any, on_cancel: Callable[[], None] | None = None) -> T:
    """``fn(*args)`` on a worker thread of trio's cache, for the data path's
    bulk work (whole messages' socket I/O, reductions, copies).

    Leaner than ``trio.to_thread.run_sync``, which the data path called a few
    times per megabyte: no capacity limiter, no context copy, no thread
    renaming (two ``prctl`` calls per job). A cancel does not abandon ``fn``,
    which may be writing into the caller's buffers: it calls ``on_cancel``
    (e.g. shut the socket ``fn`` blocks on) and waits for ``fn`` to return,
    then raises ``Cancelled``.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    cancelled = False

    def deliver(result: Any) -> None:  # an outcome.Outcome of fn
        with suppress(trio.RunFinishedError):  # then the task is long gone
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        nonlocal cancelled
        cancelled = True
        if on_cancel is not None:
            on_cancel()
        return trio.lowlevel.Abort.FAILED

    trio.lowlevel.start_thread_soon(partial(fn, *args), deliver)
    try:
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    except BaseException:
        if cancelled:  # what fn raised after on_cancel is the cancel's doing
            await trio.lowlevel.checkpoint()
        raise
    if cancelled:
        await trio.lowlevel.checkpoint()  # the scope is still cancelled: raises
    return result


def _crypto_limiter() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        lim = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        _limiter.set(lim)
        return lim


async def run_crypto(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, limiter=_crypto_limiter())


def wait_fd(fd: int, events: int, stopped: Callable[[], bool]) -> None:
    """From a worker thread: wait until ``fd`` has ``events`` or a poll tick
    passed; ``BrokenPipeError`` once ``stopped()``."""
    if stopped():
        raise BrokenPipeError("data channel stopped")
    poller = select.poll()
    poller.register(fd, events)
    poller.poll(POLL_TICK_MS)


def _when_ready(op: Callable[[], int], fd: int, events: int, stopped: Callable[[], bool]) -> int:
    """``op()`` (a syscall on the non-blocking ``fd``) from a worker thread,
    polled for ``events`` until it no longer would block; ``BrokenPipeError``
    once ``stopped()``."""
    while True:
        try:
            return op()
        except BlockingIOError:
            wait_fd(fd, events, stopped)


def write_all_blocking(fd: int, data: memoryview, stopped: Callable[[], bool]) -> None:
    """Write all of ``data`` to the non-blocking ``fd`` from a worker thread
    (the GIL is released while the kernel copies); raises ``BrokenPipeError``
    once ``stopped()``."""
    view = data
    while view:
        view = view[_when_ready(partial(os.write, fd, view), fd, select.POLLOUT, stopped):]


def read_exactly_blocking(fd: int, view: memoryview, stopped: Callable[[], bool]) -> None:
    """Fill ``view`` from the non-blocking ``fd`` from a worker thread; a stream
    that ends first raises ``EOFError(bytes got)``, a stop ``BrokenPipeError``."""
    got = 0
    while got < len(view):
        n = _when_ready(partial(os.readv, fd, [view[got:]]), fd, select.POLLIN, stopped)
        if n == 0:
            raise EOFError(got)
        got += n


class Transport(Protocol):
    """What a channel needs from a byte stream (a TCP socket, or memory in tests)."""

    async def send_all(self, data: memoryview | bytes) -> None: ...
    async def recv_into(self, view: memoryview) -> int: ...
    def close(self) -> None: ...
    def buffer_sizes(self) -> tuple[int, int]: ...


# TCP congestion control of the data sockets (``DataConfig.congestion``).
# CUBIC, the Linux default, even where the host's default is another: through
# a 200 Mbit/s tbf uplink (the netns lab, sub-millisecond base RTT) 4 peers'
# 10M fp32 ring took 2.52-2.54 s with CUBIC against 2.55-2.89 s with BBR
# (v1; the bare minimum is 2.51 s), with one or two connections a hop alike;
# BBR's rounds varied, CUBIC's did not. On loopback BBR's pacing cost 15-20%
# of the all-reduce's time. Operators whose paths are lossy
# and long (where BBR is at its best) set "bbr"; SYSTEM keeps the host's.
DEFAULT_CONGESTION: Final = "cubic"
SYSTEM_CONGESTION: Final = "system"
_CONGESTION_NAME = re.compile(r"[a-z0-9_]{1,15}")  # the kernel's TCP_CA_NAME_MAX is 16
_congestion_refused: set[str] = set()  # reported once per process, not per socket


def check_congestion(name: str) -> str:
    """``name`` if it can name a congestion control (or is ``SYSTEM_CONGESTION``);
    ``ConfigError`` saying what to write instead."""
    if name == SYSTEM_CONGESTION or _CONGESTION_NAME.fullmatch(name):
        return name
    raise ConfigError(f"data_congestion = {name!r} is not a congestion control name; use "
                      f"{DEFAULT_CONGESTION!r}, 'bbr', another one the kernel offers "
                      f"(/proc/sys/net/ipv4/tcp_available_congestion_control), or "
                      f"{SYSTEM_CONGESTION!r} for the host's default")


def host_congestion() -> str:
    """The host's default congestion control ("unknown" where it cannot be read)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def running_congestion(sock: socket.socket | trio.socket.SocketType) -> str:
    """The congestion control ``sock`` runs."""
    raw: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def set_congestion(sock: trio.socket.SocketType, name: str) -> None:
    """Run ``name`` on ``sock`` (before it connects or listens: accepted sockets
    inherit it). A refusal (not built or loadable, or not in
    ``net.ipv4.tcp_allowed_congestion_control`` for an unprivileged process)
    leaves the host's default and is logged once: the data still flows, a
    little slower on some links."""
    if name == SYSTEM_CONGESTION or not hasattr(socket, "TCP_CONGESTION"):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        if name not in _congestion_refused:
            _congestion_refused.add(name)
            event(log, "data.congestion_refused", logging.WARNING, wanted=name,
                  error=exc.strerror or exc,
                  fix="load its module or, for a user other than root, add it to "
                      "net.ipv4.tcp_allowed_congestion_control; or set data_congestion "
                      f"= {SYSTEM_CONGESTION!r}")


@dataclass(frozen=True)
class BufferLimits:
    """The kernel's socket buffer limits (bytes): the most ``SO_SNDBUF`` and
    ``SO_RCVBUF`` may ask for (``net.core.wmem_max``/``rmem_max``) and the most
    its autotuning grows a socket to (``net.ipv4.tcp_wmem``/``tcp_rmem``, third
    field); None where unknown."""

    wmem_max: int | None
    rmem_max: int | None
    tcp_wmem_max: int | None
    tcp_rmem_max: int | None


def _sysctl(name: str, field: int = 0) -> int | None:
    try:
        return int(Path("/proc/sys", name).read_text().split()[field])
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def buffer_limits() -> BufferLimits:
    """This network namespace's limits, read once per process."""
    return BufferLimits(_sysctl("net/core/wmem_max"), _sysctl("net/core/rmem_max"),
                        _sysctl("net/ipv4/tcp_wmem", 2), _sysctl("net/ipv4/tcp_rmem", 2))


def fixed_buffer(requested: int, cap: int | None, autotune_max: int | None) -> int | None:
    """What to ask ``SO_SNDBUF``/``SO_RCVBUF`` for, or None to leave the socket
    to the kernel's autotuning.

    Asking fixes the size and switches autotuning off, and the kernel caps the
    request at ``cap`` (then doubles it for its bookkeeping). Where that fixed
    size falls short of what autotuning would reach, asking only hurts: with
    the common ``rmem_max`` of 208 KiB an 8 MiB request became a ~416 KiB
    buffer, a window that holds a connection to ~30 Mbit/s at 100 ms RTT,
    where autotuning goes to its 6 MiB. Where it does not (the 2-core VMs'
    sending side: ``wmem_max`` and ``tcp_wmem`` both 4 MiB) the fixed size is
    kept. On loopback there, 10M (100M) all-reduce: both sides autotuned took
    0.102-0.119 s, both fixed 0.098-0.119 (0.86-1.00), and this plan (sending
    fixed, receiving autotuned up to 32 MiB) 0.100-0.104 (0.83-0.84)."""
    if requested <= 0:
        return None
    granted = min(requested, cap) if cap is not None else requested
    if autotune_max is not None and 2 * granted < autotune_max:
        return None
    return requested


# Unsent bytes a data socket may hold (``TCP_NOTSENT_LOWAT``; 0: the kernel's
# default, the whole send buffer). A small message written behind a bulk
# transfer (a status report, a member's history, another tag's round) waits
# for the stripe on the wire (``peerd.datalink``) and for what the socket
# holds unsent: up to its 8 MiB buffer, 0.6 s per hop at 100 Mbit/s.
# ``benchmarks/small_behind_large.py`` (4 nodes, loopback shaped to 200
# Mbit/s): a 1000-element all-reduce started while a 2M one ran took
# 0.82-0.94 s with 256 KiB against 1.39-1.54 s with the kernel's default
# (1.24 s with 1 MiB); the large one's time did not move (1.93 s), nor did
# the loopback benchmark's (10M, two runs each: 0.054-0.059 s in place
# against 0.061-0.065) or the shaped ring's share of the link (0.95). Data
# already sent and in flight is not counted: the window a long fat pipe
# needs is untouched. A node's sockets get it (``NodeConfig``); a bare
# channel's keep the kernel's (``DataConfig``). A data link holds each of its
# channels below it on slow links (``LinkConfig.unsent_seconds``).
DEFAULT_NOTSENT_LOWAT = 256 * 1024


def set_notsent_lowat(sock: trio.socket.SocketType, limit: int) -> None:
    """Hold at most ``limit`` unsent bytes on ``sock`` (where the kernel has
    ``TCP_NOTSENT_LOWAT``); may be changed at any time."""
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, limit)


def tune_socket(sock: trio.socket.SocketType, buffer_size: int,
                congestion: str = SYSTEM_CONGESTION, notsent_lowat: int = 0) -> None:
    """Options every data socket gets; call before connect/listen so the TCP
    window scale is negotiated for the buffers (and accepted sockets inherit
    the listener's). ``buffer_size`` is asked for each direction where the
    kernel grants more than its autotuning reaches (``fixed_buffer``);
    ``notsent_lowat``: see ``DEFAULT_NOTSENT_LOWAT`` (0: the kernel's default)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    limits = buffer_limits()
    sndbuf = fixed_buffer(buffer_size, limits.wmem_max, limits.tcp_wmem_max)
    rcvbuf = fixed_buffer(buffer_size, limits.rmem_max, limits.tcp_rmem_max)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if notsent_lowat > 0:
        set_notsent_lowat(sock, notsent_lowat)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    set_congestion(sock, congestion)


class SocketTransport:
    """A TCP socket as a ``Transport``.

    Reads and writes go straight to the non-blocking file descriptor and wait
    for readiness only when the kernel has nothing to give or no room, unlike
    trio's socket methods, which also yield to the scheduler after every
    successful call: at one call per record that was a large share of the
    data plane's CPU time. These methods are therefore checkpoints only when
    they block (a cancelled caller still stops at its next call); callers that
    loop over data that is always ready must yield on their own.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def send_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        while view:
            try:
                sent = os.write(self.sock.fileno(), view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]

    async def recv_into(self, view: memoryview) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return os.readv(self.sock.fileno(), [view])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self) -> None:
        """Wake any thread blocked on the socket (it sees EOF or an error);
        the descriptor stays open until ``close``, so it is never reused under them."""
        with suppress(OSError):  # not connected any more: nothing is blocked on it
            self.sock.shutdown(socket.SHUT_RDWR)

    def buffer_sizes(self) -> tuple[int, int]:
        """(SO_SNDBUF, SO_RCVBUF) as granted by the kernel."""
        return (
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )


async def recv_exactly(transport: Transport, view: memoryview) -> None:
    """Fill ``view``; a stream that ends first raises ``EOFError``."""
    got = 0
    while got < len(view):
        n = await transport.recv_into(view[got:])
        if n == 0:
            raise EOFError(got)
        got += n


@dataclass(frozen=True)
class ChannelStats:
    bytes_sent: int
    bytes_received: int
    records_sent: int
    records_received: int
    rekeys_sent: int
    rekeys_received: int
    messages_sent: int
    messages_received: int
    sndbuf: int
    rcvbuf: int


def as_bytes_view(buf: Any) -> memoryview:
    """A flat byte view of any C-contiguous buffer (bytes, bytearray, numpy)."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("payload buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
