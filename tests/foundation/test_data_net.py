"""Data links between real nodes: 1 GiB with checksums, garbage on the TCP port."""

from __future__ import annotations

import os
from typing import Any

import blake3
import numpy as np
import pytest
import trio

from peerd import aead
from peerd.config import NodeConfig
from peerd.errors import ConfigError, PeerLost
from peerd.identity import SwarmKey
from peerd.node import open_node

KEY = SwarmKey(b"d" * 32)
MIB = 1024 * 1024


async def send_and_receive(out: Any, inbound: Any, key: bytes, payload: bytes) -> None:
    """Send ``payload`` over ``out`` and check that ``inbound`` gets it whole."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.send, key, payload)
            assert bytes(await inbound.receive(key)) == payload


async def test_one_gib_over_four_channels_with_checksums() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        await a.connect(b.listen_address)
        out = await a.open_data_channels(b.peer_id, 4)
        inbound = await b.accept_data_channels(a.peer_id)
        rng = np.random.default_rng(7)
        block = rng.integers(0, 256, size=64 * MIB, dtype=np.uint8)
        sent: list[bytes] = []
        received: list[bytes] = []

        async def send_all() -> None:
            for i in range(16):
                block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # each distinct
                sent.append(blake3.blake3(block).digest())
                await out.send(f"blk{i}".encode(), block)

        async def receive_all() -> None:
            buf = np.empty(64 * MIB, np.uint8)
            for i in range(16):
                await inbound.receive_into(f"blk{i}".encode(), buf)
                received.append(blake3.blake3(buf).digest())

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                nursery.start_soon(receive_all)
        assert len(received) == 16 and received == sent
        assert len(set(sent)) == 16
        assert out.statistics().payload_bytes_sent == 16 * 64 * MIB


async def test_tcp_garbage_leaves_data_port_serving() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        await a.connect(b.listen_address)
        port = b.statistics().data_port
        for payload in [b"", os.urandom(16), os.urandom(4096), b"PEERD" + b"\xff" * 200,
                        b"\x00" * 100_000]:
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            try:
                if payload:
                    await sock.send(payload)
            finally:
                sock.close()
        link = await a.open_data_channels(b.peer_id, 2)
        inbound = await b.accept_data_channels(a.peer_id)
        await send_and_receive(link, inbound, b"after", b"still serving")


async def linked_pair_moves(a: Any, b: Any, nbytes: int) -> tuple[Any, Any]:
    """Open a 2-channel link a -> b, move ``nbytes`` random bytes over it and
    check they arrived whole; returns (a's outbound link, b's inbound link)."""
    await a.connect(b.listen_address)
    out = await a.open_data_channels(b.peer_id, 2)
    inbound = await b.accept_data_channels(a.peer_id)
    data = np.random.default_rng(nbytes).integers(0, 256, size=nbytes, dtype=np.uint8)
    buf = np.empty_like(data)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.send, b"big", data)
            await inbound.receive_into(b"big", buf)
    assert np.array_equal(buf, data)
    return out, inbound


async def test_larger_records_carry_each_stripe_in_one_record() -> None:
    cfg = NodeConfig(data_record=4 * MIB)
    async with open_node(KEY, config=cfg) as a, open_node(KEY, config=cfg) as b:
        out, _ = await linked_pair_moves(a, b, 6 * MIB)
        stats = out.statistics()
        # Two stripes of 3 MiB, one record each, plus each message's head record
        # (1 MiB records would have taken 3 payload records per stripe).
        assert stats.parts_sent == 2
        assert sum(c.records_sent for c in stats.per_channel) == 2 * 2


@pytest.mark.parametrize(("ciphers_a", "ciphers_b", "chosen"), [
    (None, None, aead.built()[0]),  # both installs have pyaegis: this CPU's fastest
    ((aead.AEGIS128X2, aead.AEGIS128L), None, aead.AEGIS128X2),  # the dialler's first
    (None, (aead.AEGIS128L,), aead.AEGIS128L),  # one peer without it still talks
])
async def test_nodes_agree_on_the_record_cipher_and_move_data_with_it(
        ciphers_a: tuple[str, ...] | None, ciphers_b: tuple[str, ...] | None,
        chosen: str) -> None:
    async with open_node(KEY, config=NodeConfig(data_ciphers=ciphers_a)) as a, \
            open_node(KEY, config=NodeConfig(data_ciphers=ciphers_b)) as b:
        out, inbound = await linked_pair_moves(a, b, 3 * MIB)
        assert {c.cipher for c in out._channels} == {c.cipher for c in inbound._channels} \
            == {chosen}


async def test_unknown_cipher_is_refused_with_what_to_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="data_ciphers: rot13: not a cipher this install"):
        NodeConfig(data_ciphers=("rot13",))
    monkeypatch.setenv("PEERD_CIPHERS", "rot13")
    with pytest.raises(ValueError, match="PEERD_CIPHERS='rot13' names no cipher"):
        async with open_node(KEY):
            pass


def test_record_size_out_of_range_is_refused_with_the_range() -> None:
    for bad in (1024, 64 * MIB):
        with pytest.raises(ConfigError, match="use 64 KiB to 16 MiB, the same on every peer"):
            NodeConfig(data_record=bad)


async def test_small_message_on_a_broken_link_raises_peer_lost_and_fails_the_link() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        await a.connect(b.listen_address)
        out = await a.open_data_channels(b.peer_id, 2)
        inbound = await b.accept_data_channels(a.peer_id)
        await send_and_receive(out, inbound, b"first", b"goes direct")
        with trio.fail_after(20):
            await inbound.aclose()  # the far end goes away
            with pytest.raises(PeerLost):
                for i in range(100):  # the first writes may still land in the kernel
                    await out.send(b"k%d" % i, b"x" * 100)
                    await trio.sleep(0.01)
        assert out.failed


async def test_a_small_send_cancelled_before_it_starts_sends_nothing() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        await a.connect(b.listen_address)
        out = await a.open_data_channels(b.peer_id, 1)  # one channel: messages keep order
        inbound = await b.accept_data_channels(a.peer_id)
        with trio.CancelScope() as scope:
            scope.cancel()
            await out.send(b"never", b"cancelled before it started")
        assert scope.cancelled_caught
        await send_and_receive(out, inbound, b"after", b"the link is still up")
        # "never" would have come first on the one channel.
        stats = inbound.statistics()
        assert stats.parts_received == 1 and stats.pending_keys == 0 and not out.failed
