"""TCP congestion control of the data sockets (``DataConfig.congestion``): both
ends of a channel run the configured one (the accepted end inherits the
listener's), ``"system"`` keeps the host's, and a name the kernel refuses
leaves the host's with one warning, the channel working all the same."""

from __future__ import annotations

import logging
import socket

import pytest

from peerd.config import NodeConfig
from peerd.datachan import DataConfig
from peerd.datasock import (
    SYSTEM_CONGESTION,
    check_congestion,
    host_congestion,
    running_congestion,
)
from peerd.datastream import DataChannel
from peerd.errors import ConfigError
from peerd.identity import SwarmKey

from .conftest import node_link_sockets, open_rig

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"),
                                reason="TCP_CONGESTION is Linux's")

KEY = SwarmKey(b"t" * 32)


def _other_than_default() -> str:
    # Reno is built into every Linux kernel and allowed to every user; where
    # it is the host's default, CUBIC (the kernel's own default) is the other.
    return "reno" if host_congestion() != "reno" else "cubic"


def _running(chan: DataChannel) -> str:
    return running_congestion(chan._t.sock)  # type: ignore[attr-defined]


async def _still_carries_data(a: DataChannel, b: DataChannel) -> None:
    await a.send(b"k", b"x" * 100_000)
    key, body = await b.receive()
    assert (key, bytes(body)) == (b"k", b"x" * 100_000)


async def test_both_ends_of_a_channel_run_the_configured_congestion_control() -> None:
    want = _other_than_default()
    async with open_rig(DataConfig(congestion=want)) as rig:
        dialed, accepted = await rig.pair()
        assert (_running(dialed), _running(accepted)) == (want, want)
        await _still_carries_data(dialed, accepted)


async def test_system_keeps_the_hosts_congestion_control() -> None:
    async with open_rig(DataConfig(congestion=SYSTEM_CONGESTION)) as rig:
        dialed, accepted = await rig.pair()
        assert _running(dialed) == _running(accepted) == host_congestion()


async def test_a_refused_name_keeps_the_hosts_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="peerd.datasock")
    async with open_rig(DataConfig(congestion="nosuchcc")) as rig:
        pairs = [await rig.pair() for _ in range(2)]  # a listener and two dials
        for dialed, accepted in pairs:
            assert _running(dialed) == _running(accepted) == host_congestion()
            await _still_carries_data(dialed, accepted)
            await _still_carries_data(accepted, dialed)
    warned = [r for r in caplog.records if "data.congestion_refused" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "wanted=nosuchcc" in warned[0].getMessage()
    assert "tcp_allowed_congestion_control" in warned[0].getMessage()


def test_a_name_that_cannot_be_one_is_a_config_error_saying_what_to_write() -> None:
    for bad in ("", "BBR", "cubic!", "x" * 16, "bbr v2"):
        with pytest.raises(ConfigError, match="not a congestion control name; use 'cubic'"):
            NodeConfig(data_congestion=bad)
    for good in ("cubic", "bbr", "reno", "system", "x" * 15):
        assert check_congestion(good) == good


async def test_nodes_dial_and_accept_with_their_configured_congestion_control() -> None:
    """Through the node: its config reaches both ends' data sockets."""
    want = _other_than_default()
    assert await node_link_sockets(NodeConfig(data_congestion=want), running_congestion) == {want}
