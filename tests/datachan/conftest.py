"""Loopback helpers: a listener plus dialed, authenticated channel pairs."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from peerd import aead, datapump
from peerd.config import NodeConfig
from peerd.datachan import DataConfig, DataListener, dial_data_channel
from peerd.dataproto import TokenTable
from peerd.datastream import DataChannel
from peerd.identity import SwarmKey
from peerd.node import open_node
from peerd.record import Keying


@dataclass
class Rig:
    listener: DataListener
    tokens: TokenTable
    keying: Keying
    port: int
    accepted: trio.MemoryReceiveChannel[tuple[str, DataChannel]]
    config: DataConfig
    opened: list[DataChannel] = field(default_factory=list)

    def token(self, peer: str = "dialer") -> bytes:
        return self.tokens.issue(peer, self.keying, 30.0, trio.current_time())

    async def pair(self) -> tuple[DataChannel, DataChannel]:
        """(dialer's channel, listener's channel) of one fresh connection."""
        dialed = await dial_data_channel(
            "127.0.0.1", self.port, self.token(), self.keying, "listener", self.config)
        peer, accepted = await self.accepted.receive()
        assert peer == "dialer"
        self.opened += [dialed, accepted]
        return dialed, accepted

    async def pairs(self, n: int) -> tuple[list[DataChannel], list[DataChannel]]:
        got = [await self.pair() for _ in range(n)]
        return [a for a, _ in got], [b for _, b in got]


@asynccontextmanager
async def open_rig(config: DataConfig | None = None, max_pending: int = 64) -> AsyncIterator[Rig]:
    config = config or DataConfig()
    send, recv = trio.open_memory_channel[tuple[str, DataChannel]](64)
    tokens = TokenTable()
    listener = DataListener(tokens, lambda p, c: send.send_nowait((p, c)),
                            max_pending=max_pending, config=config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve)
        # The session's cipher: the first this process offers (see record_loops).
        rig = Rig(listener, tokens, Keying(os.urandom(32), aead.supported()[0]), port, recv,
                  config)
        try:
            yield rig
        finally:
            for chan in rig.opened:
                chan.abort()
            nursery.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def collect_after() -> Iterator[None]:
    """Each test ends with a full garbage collection: a buffer still exported
    to C when its channel is torn down then crashes this test, not a later
    one (a refused record on a crypto worker thread once did, with SIGSEGV)."""
    yield
    gc.collect()


@pytest.fixture(params=[("native", aead.AEGIS128X2), ("native", aead.AEGIS128L),
                        ("python", aead.AEGIS128L)], ids=lambda p: "-".join(p))
def record_loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test over the native record loops with each cipher, and over the
    Python ones with AEGIS-128L (what a machine without a C compiler runs:
    pyaegis needs one too). The rig's sessions use the cipher given here."""
    loops, cipher = request.param
    if loops == "native":
        assert datapump.built(), "peerd._datapump is not built: pip install -e . with a C compiler"
    assert cipher in aead.built(), f"{cipher} is not available: pip install -e '.[dev]'"
    monkeypatch.setattr(datapump, "_enabled", loops == "native")
    monkeypatch.setenv("PEERD_CIPHERS", cipher)
    return str(loops)


async def node_link_sockets(config: NodeConfig, read: Callable[[Any], Any]) -> set[Any]:
    """``read`` of every data socket of both ends of a link between two nodes
    of ``config``, once a message went through it."""
    key = SwarmKey(b"n" * 32)
    async with open_node(key, config=config) as a, open_node(key, config=config) as b:
        await a.connect(b.listen_address)
        out = await a.open_data_channels(b.peer_id, 2)
        inbound = await b.accept_data_channels(a.peer_id)
        with trio.fail_after(10):
            await out.send(b"k", b"hello")
            assert bytes(await inbound.receive(b"k")) == b"hello"
        return {read(c._t.sock) for link in (out, inbound) for c in link._channels}
