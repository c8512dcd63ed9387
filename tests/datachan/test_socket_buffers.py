"""Socket buffers of the data sockets: a fixed size only where the kernel
grants more than its own autotuning would reach, so a host with the common
208 KiB ``rmem_max`` keeps autotuned (multi-MB) windows instead of a fixed
~416 KiB one that would hold a long path to a few tens of Mbit/s."""

from __future__ import annotations

import socket

import pytest
import trio

from peerd import datasock
from peerd.datasock import BufferLimits, buffer_limits, fixed_buffer, tune_socket

MIB = 1 << 20
STOCK = BufferLimits(wmem_max=212_992, rmem_max=212_992, tcp_wmem_max=4 * MIB,
                     tcp_rmem_max=6 * MIB)  # an untuned Linux host
THIS_KIND_OF_VM = BufferLimits(wmem_max=4 * MIB, rmem_max=4 * MIB, tcp_wmem_max=4 * MIB,
                               tcp_rmem_max=32 * MIB)
ROOMY = BufferLimits(wmem_max=64 * MIB, rmem_max=64 * MIB, tcp_wmem_max=4 * MIB,
                     tcp_rmem_max=6 * MIB)


@pytest.mark.parametrize(("limits", "send", "receive"), [
    (STOCK, None, None),  # capped far below autotuning: leave both to the kernel
    (THIS_KIND_OF_VM, 8 * MIB, None),  # 2 x 4 MiB >= 4 MiB sends; 8 MiB < 32 MiB receives
    (ROOMY, 8 * MIB, 8 * MIB),
    (BufferLimits(None, None, None, None), 8 * MIB, 8 * MIB),  # nothing known: ask
])
def test_a_fixed_buffer_only_where_it_beats_autotuning(
        limits: BufferLimits, send: int | None, receive: int | None) -> None:
    assert fixed_buffer(8 * MIB, limits.wmem_max, limits.tcp_wmem_max) == send
    assert fixed_buffer(8 * MIB, limits.rmem_max, limits.tcp_rmem_max) == receive
    assert fixed_buffer(0, limits.rmem_max, limits.tcp_rmem_max) is None  # 0: always autotune


def _sizes(sock: trio.socket.SocketType) -> tuple[int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


async def test_a_stock_host_keeps_the_kernels_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.socket.socket() as plain:
        untouched = _sizes(plain)
    monkeypatch.setattr(datasock, "buffer_limits", lambda: STOCK)
    with trio.socket.socket() as sock:
        tune_socket(sock, 8 * MIB)
        assert _sizes(sock) == untouched


async def test_this_hosts_sockets_follow_its_plan() -> None:
    limits = buffer_limits()
    with trio.socket.socket() as plain:
        untouched = _sizes(plain)
    with trio.socket.socket() as sock:
        tune_socket(sock, 8 * MIB)
        got = _sizes(sock)
    plans = (fixed_buffer(8 * MIB, limits.wmem_max, limits.tcp_wmem_max),
             fixed_buffer(8 * MIB, limits.rmem_max, limits.tcp_rmem_max))
    caps = (limits.wmem_max, limits.rmem_max)
    for size, plan, cap, before in zip(got, plans, caps, untouched, strict=True):
        if plan is None:
            assert size == before
        else:  # Linux doubles what it grants, for its bookkeeping
            assert size == 2 * min(plan, cap if cap is not None else plan)
