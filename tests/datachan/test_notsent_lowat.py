"""Unsent bytes a data socket may hold (``DataConfig.notsent_lowat``): both
ends of a channel get the configured bound (the accepted end inherits the
listener's), 0 leaves the kernel's default, and a node's config reaches its
sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from peerd.config import NodeConfig
from peerd.datachan import DataConfig
from peerd.datasock import DEFAULT_NOTSENT_LOWAT
from peerd.datastream import DataChannel
from peerd.errors import ConfigError
from peerd.identity import SwarmKey

from .conftest import node_link_sockets, open_rig

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"),
                                reason="TCP_NOTSENT_LOWAT is Linux's")

KEY = SwarmKey(b"w" * 32)


def _lowat(chan: DataChannel) -> int:
    sock = chan._t.sock  # type: ignore[attr-defined]
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))


def _host_default() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_notsent_lowat").read_text())


async def test_both_ends_of_a_channel_hold_at_most_the_configured_unsent_bytes() -> None:
    async with open_rig(DataConfig(notsent_lowat=96 * 1024)) as rig:
        dialed, accepted = await rig.pair()
        assert (_lowat(dialed), _lowat(accepted)) == (96 * 1024, 96 * 1024)
        got: list[tuple[bytes, bytes]] = []

        async def receive() -> None:
            key, body = await accepted.receive()
            got.append((key, bytes(body)))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await dialed.send(b"k", b"x" * 1_000_000)  # past the bound: written as it drains
        assert got == [(b"k", b"x" * 1_000_000)]


async def test_zero_keeps_the_kernels_default_and_a_nodes_default_is_bounded() -> None:
    async with open_rig(DataConfig(notsent_lowat=0)) as rig:
        dialed, accepted = await rig.pair()
        assert _lowat(dialed) == _lowat(accepted) == 0  # unset: the sysctl applies
    assert NodeConfig().data_notsent_lowat == DEFAULT_NOTSENT_LOWAT < _host_default()


def test_an_out_of_range_bound_is_a_config_error_saying_what_to_write() -> None:
    for bad in (-1, 2 << 30):
        with pytest.raises(ConfigError, match=r"use 0 \(the kernel.s default\) to 1 GiB"):
            NodeConfig(data_notsent_lowat=bad)


async def test_a_nodes_config_reaches_both_ends_data_sockets() -> None:
    got = await node_link_sockets(
        NodeConfig(data_notsent_lowat=128 * 1024),
        lambda sock: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))
    assert got == {128 * 1024}
