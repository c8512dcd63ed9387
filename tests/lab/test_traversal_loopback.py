"""NAT traversal pieces that need no namespaces: NAT info, the datagram
framing of relay circuits, and relayed sessions between in-process nodes on
loopback (these run everywhere, root or not)."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.endpoint import Endpoint, NatType
from nat.relay import Relay, RelayLimits
from peerd.errors import PeerdError, PeerLost
from peerd.identity import SwarmKey
from peerd.nat_pipe import LENGTH, _Deframer
from peerd.natstate import NAT_INFO_VERSION, NatInfo, NatState
from peerd.node import Node, open_node
from peerd.session import Session
from peerd.traversal import Traversal
from peerd.wire import decode_untrusted, encode

ME = ("10.1.0.2", 4000)


def _observe(state: NatState, seen: list[tuple[str, int]]) -> None:
    for i, addr in enumerate(seen):
        state.record((f"198.51.100.{i + 1}", 4747), addr, now=1.0)


@pytest.mark.parametrize("seen,nat_type,preserving", [
    ([("203.0.113.5", 4000), ("203.0.113.5", 4000)], NatType.EASY, True),
    ([("203.0.113.5", 4100), ("203.0.113.5", 4100)], NatType.EASY, False),
    ([("203.0.113.5", 4100), ("203.0.113.5", 4377)], NatType.HARD, False),
    ([("203.0.113.5", 4000)], NatType.UNKNOWN, False),
])
def test_nat_info_from_observations(seen: list[tuple[str, int]], nat_type: NatType,
                                    preserving: bool) -> None:
    state = NatState([ME])
    _observe(state, seen)
    info = state.info(now=2.0)
    assert info.nat_type is nat_type
    assert info.port_preserving is preserving
    assert info.private == (Endpoint(*ME),)
    if nat_type is NatType.EASY:
        assert info.public == (Endpoint(*seen[0]),) and info.public_ip == "203.0.113.5"
    assert decode_untrusted(encode(info), expect=NatInfo) == info


def test_public_node_advertises_its_own_address() -> None:
    state = NatState([("203.0.113.9", 5000)])
    _observe(state, [("203.0.113.9", 5000)] * 2)
    info = state.info(now=2.0)
    assert info.nat_type is NatType.PUBLIC and info.public == (Endpoint("203.0.113.9", 5000),)
    assert info.private == () and info.port_preserving


def test_nat_info_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        NatInfo(NAT_INFO_VERSION + 1, NatType.EASY, None, (), (), 0, False)
    with pytest.raises(ValueError):
        NatInfo(NAT_INFO_VERSION, NatType.EASY, None, (Endpoint("1.2.3.4", 1),) * 9, (), 0, True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=1500), max_size=20), st.integers(1, 97))
def test_deframer_recovers_datagrams_whatever_the_chunking(datagrams: list[bytes],
                                                           cut: int) -> None:
    stream = b"".join(LENGTH.pack(len(d)) + d for d in datagrams)
    deframer = _Deframer()
    out: list[bytes] = []
    for i in range(0, len(stream), cut):
        out.extend(deframer.feed(stream[i:i + cut]))
    assert out == datagrams


def _keep_relayed(*nodes: Node) -> None:
    """On loopback every pair has a network path (the DHT dials them anyway);
    make these nodes keep a relayed session over it, as if none existed."""
    for node in nodes:
        t = node.traversal

        def prefer(old: Session, new: Session, t: Traversal = t) -> tuple[Session, Session]:
            return (new, old) if t.is_relayed_conn(new.conn) else (old, new)

        t.prefer = prefer  # type: ignore[method-assign]


async def _relayed(a: Node, b: Node, r: Node) -> None:
    """A session between ``a`` and ``b`` through relay ``r``, kept as their only one."""
    _keep_relayed(a, b)
    await a.connect(r.listen_addresses[0])
    await b.connect(r.listen_addresses[0])
    with trio.fail_after(20):
        await a.traversal.relay_to(b.peer_id, r.peer_id)


async def test_relayed_session_carries_rpc_and_data_then_upgrades() -> None:
    key = SwarmKey(os.urandom(32))
    async with open_node(key) as r, open_node(key) as a, open_node(key) as b:
        await _relayed(a, b, r)
        path = f"relay:{r.peer_id.short}"
        assert a.peer_path(b.peer_id) == path and b.peer_path(a.peer_id) == path
        assert (a.peer_id.short, a.peer_path(a.peer_id)) not in a.statistics().peer_paths
        assert (b.peer_id.short, path) in a.statistics().peer_paths
        # The relay's pipe has no address: it never shows up as an observation.
        assert all(host and port for host, port in a.observed.values())
        payload = os.urandom(300_000)
        got = bytearray()

        async def receive() -> None:
            link = await b.accept_data_channels(a.peer_id, "t")
            got.extend(await link.receive(b"k"))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                link = await a.open_data_channels(b.peer_id, 2, "t")
                await link.send(b"k", payload)
        assert bytes(got) == payload
        assert a.data.routes_used["quic"] == 1
        relay_stats = r.traversal.statistics().relay
        assert relay_stats.open_circuits == 1 and relay_stats.bytes_total > len(payload)
        for node in (a, b):
            del node.traversal.prefer  # back to the real rule: a network path wins
        with trio.fail_after(30):
            upgraded = await a.traversal.try_upgrade(b.peer_id)
        assert not upgraded.startswith("relay:") and upgraded != "none"
        assert a.peer_path(b.peer_id) == upgraded


async def test_what_aioquic_cannot_take_through_a_circuit_ends_the_circuit_only() -> None:
    key = SwarmKey(os.urandom(32))
    async with open_node(key) as r, open_node(key) as a, open_node(key) as b:
        await _relayed(a, b, r)
        conn = a.session(b.peer_id).conn
        assert a.traversal.is_relayed_conn(conn)

        def broken(data: bytes, addr: object, now: float) -> None:
            raise IndexError("list index out of range")

        conn.quic.receive_datagram = broken  # type: ignore[method-assign]
        with trio.fail_after(20):
            with pytest.raises(PeerdError):
                await b.call(a.peer_id, "peerd.nat.info", timeout=5)
            await conn.closed_event.wait()
        assert conn.close_reason == "internal error on datagram: IndexError"
        # Node a goes on: its session with the relay still carries calls.
        with trio.fail_after(10):
            assert await a.call(r.peer_id, "peerd.nat.info")


async def test_relay_refusal_is_reported_with_its_reason() -> None:
    key = SwarmKey(os.urandom(32))
    async with open_node(key) as r, open_node(key) as a, open_node(key) as b:
        await a.connect(r.listen_addresses[0])
        await b.connect(r.listen_addresses[0])
        r.traversal.relay.core = Relay(RelayLimits(max_circuits_per_peer=0))
        with trio.fail_after(20), pytest.raises(PeerLost, match="too many circuits"):
            await a.traversal.relay_to(b.peer_id, r.peer_id)
        assert r.traversal.statistics().relay.refused_total == 1
        assert a.peer_path(b.peer_id) == "none"


async def test_relayed_peer_is_reached_again_when_its_relay_leaves() -> None:
    key = SwarmKey(os.urandom(32))
    async with open_node(key) as a, open_node(key) as b, open_node(key) as r2:
        async with open_node(key) as r1:
            _keep_relayed(a, b)
            for n in (a, b):
                await n.connect(r1.listen_addresses[0])
                await n.connect(r2.listen_addresses[0])
            with trio.fail_after(20):
                await a.traversal.relay_to(b.peer_id, r1.peer_id)
            assert a.peer_path(b.peer_id) == f"relay:{r1.peer_id.short}"
        # r1 shut down: a reconnects on its own, not through r1. A relayed session
        # that does not see its pipe close is only noticed at the 20 s QUIC idle
        # timeout, then re-established through r2.
        with trio.fail_after(60):
            while a.peer_path(b.peer_id) in ("none", f"relay:{r1.peer_id.short}"):
                await trio.sleep(0.1)
        assert await a.call(b.peer_id, "peerd.nat.info")
