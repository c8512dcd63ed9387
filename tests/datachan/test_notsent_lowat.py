"""Unsent bytes a data socket may hold (``DataConfig.notsent_lowat``): both
ends of a channel get the configured bound (the accepted end inherits the
listener's), 0 leaves the kernel's default, and a node's config reaches its
sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from peerd.config import NodeConfig
from peerd.datachan import DataConfig
from peerd.datalink import LinkConfig, open_data_link
from peerd.datasock import DEFAULT_NOTSENT_LOWAT
from peerd.datastream import MIN_UNSENT, DataChannel
from peerd.errors import ConfigError
from peerd.identity import SwarmKey

from .conftest import node_link_sockets, open_rig

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"),
                                reason="TCP_NOTSENT_LOWAT is Linux's")

KEY = SwarmKey(b"w" * 32)
MIB = 1024 * 1024


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


async def test_a_channel_limits_its_unsent_bytes_within_its_bound() -> None:
    """``limit_unsent`` sets the socket's bound to a power of two between
    ``MIN_UNSENT`` and the configured bound; a channel without a bound keeps
    the kernel's default whatever it is asked."""
    async with open_rig(DataConfig(notsent_lowat=256 * 1024)) as rig:
        chan, _ = await rig.pair()
        for asked, want in ((100_000, 64 * 1024), (1, MIN_UNSENT), (10 << 20, 256 * 1024),
                            (MIN_UNSENT * 3, MIN_UNSENT * 2)):
            chan.limit_unsent(asked)
            assert (_lowat(chan), chan.unsent_limit) == (want, want), asked
    async with open_rig(DataConfig(notsent_lowat=0)) as rig:
        chan, _ = await rig.pair()
        chan.limit_unsent(100_000)
        assert (_lowat(chan), chan.unsent_limit) == (0, 0)


@pytest.mark.parametrize("unsent_seconds, bounded", [(1e-9, True), (1e6, False)])
async def test_a_link_holds_unsent_bytes_for_about_unsent_seconds_at_its_pace(
        unsent_seconds: float, bounded: bool) -> None:
    """Once stripes were timed, each channel that sent one holds about
    ``unsent_seconds`` of unsent bytes at the link's pace: on a slow link a
    small message then queues behind little, while a link that drains fast
    enough keeps the configured bound."""
    bound = 256 * 1024
    cfg = LinkConfig(part_size=MIB, min_part=16 * 1024, unsent_seconds=unsent_seconds)
    async with open_rig(DataConfig(notsent_lowat=bound)) as rig:
        a, b = await rig.pairs(2)
        async with open_data_link("l", a, cfg) as tx, open_data_link("d", b, cfg) as rx:
            payload = os.urandom(4 * MIB)
            await tx.send(b"k", payload)
            assert await rx.receive(b"k") == payload
            limits = {chan.unsent_limit for chan in a}
            assert limits == ({MIN_UNSENT} if bounded else {bound}), limits
            assert {_lowat(chan) for chan in a} == limits


def test_a_link_config_without_a_positive_unsent_time_says_which_field() -> None:
    for bad in (0.0, float("inf"), -1.0):
        with pytest.raises(ValueError, match="unsent_seconds"):
            LinkConfig(unsent_seconds=bad)
