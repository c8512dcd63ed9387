"""Real sockets on loopback: sessions, admission, RPC semantics, hostile input."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

import peerd.session
from peerd.config import NodeConfig
from peerd.errors import AuthError, PeerdError, RemoteError, Timeout
from peerd.handshake import ClientHandshake
from peerd.identity import Identity, PeerId, SwarmKey
from peerd.node import Node, open_node
from peerd.rpc import RpcLimits
from peerd.session import _wait_or_closed
from peerd.tlscert import peer_certificate_key

KEY = SwarmKey(b"s" * 32)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that has no event of its own (remote-side counters)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def echo(peer: PeerId, payload: bytes) -> bytes:
    return peer.raw + payload


async def test_two_nodes_call_both_ways() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        a.register("echo", echo)
        b.register("echo", echo)
        assert await a.connect(b.listen_addresses[0]) == b.peer_id
        assert await a.call(b.peer_id, "echo", b"x") == a.peer_id.raw + b"x"
        assert await b.call(a.peer_id, "echo", b"y") == b.peer_id.raw + b"y"
        assert a.statistics().observed_addresses == (a.listen_addresses[0],)


async def test_five_node_mesh() -> None:
    async with AsyncExitStack() as stack:
        nodes: list[Node] = [await stack.enter_async_context(open_node(KEY)) for _ in range(5)]
        for n in nodes:
            n.register("echo", echo)
        for i, n in enumerate(nodes):
            for m in nodes[i + 1 :]:
                await n.connect(m.listen_address)
        for n in nodes:
            assert {p for p in n.peers()} == {m.peer_id for m in nodes if m is not n}
            for m in nodes:
                if m is not n:
                    assert await n.call(m.peer_id, "echo", b"!") == n.peer_id.raw + b"!"


async def test_simultaneous_dial_keeps_one_session() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        b.register("echo", echo)
        a.register("echo", echo)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.connect, b.listen_address)
            nursery.start_soon(b.connect, a.listen_address)
        assert await a.call(b.peer_id, "echo", b"1") == a.peer_id.raw + b"1"
        assert await b.call(a.peer_id, "echo", b"2") == b.peer_id.raw + b"2"


async def test_duplicates_admitted_in_another_order_keep_the_pair_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """a dials b twice; b admits the two sessions in the other order than a did
    (as happens under load), so each end first uses a different one. Only the
    dialler retires a duplicate, and b falls back to the survivor: the pair
    stays connected and nobody sees the peer lost."""
    async with open_node(KEY) as a, open_node(KEY) as b:
        a.register("echo", echo)
        b.register("echo", echo)
        lost: list[PeerId] = []
        a.on_peer_lost(lost.append)
        b.on_peer_lost(lost.append)
        real, accepted, gate = peerd.node.server_session, [], trio.Event()

        async def admit_first_one_last(*args: object) -> peerd.session.Session:
            session = await real(*args)  # type: ignore[arg-type]
            accepted.append(session)
            if len(accepted) == 1:
                await gate.wait()
            return session

        monkeypatch.setattr("peerd.node.server_session", admit_first_one_last)
        await a.connect(b.listen_address)
        await a.connect(b.listen_address)  # a keeps the newer, retires the first
        await wait_until(lambda: a.peer_id in b._sessions)
        gate.set()
        await wait_until(lambda: len(b._spares.get(a.peer_id, [])) == 1)
        first, second = accepted
        assert a._sessions[b.peer_id].keying == second.keying
        await wait_until(lambda: first.conn.closed and b._sessions[a.peer_id] is second)
        assert await a.call(b.peer_id, "echo", b"1") == a.peer_id.raw + b"1"
        assert await b.call(a.peer_id, "echo", b"2") == b.peer_id.raw + b"2"
        assert lost == [] and b.peers() == [a.peer_id] and a.peers() == [b.peer_id]
        a.disconnect(b.peer_id)  # closes every session with b, duplicates included
        # Each end reports its loss when its own sessions have ended: wait for
        # both, not just b's (a's callback can come later under load).
        await wait_until(lambda: b.peers() == [] and len(lost) >= 2)
        assert lost == [b.peer_id, a.peer_id] or lost == [a.peer_id, b.peer_id]


async def test_a_retiring_duplicate_that_takes_over_stays_open(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """a dials b twice and retires the first session while its own slow call
    runs on it; the session it kept dies meanwhile, and the first one takes
    its place. Once the call ends the first stays open: it is the pair's
    session now (before: closed as a duplicate all the same, which cut the
    pair off and failed the next call with "duplicate session")."""
    async with open_node(KEY) as a, open_node(KEY) as b:
        entered, release = trio.Event(), trio.Event()

        async def slow(peer: PeerId, payload: bytes) -> bytes:
            entered.set()
            await release.wait()
            return b"done"

        b.register("slow", slow)
        b.register("echo", echo)
        draining, drained = trio.Event(), trio.Event()
        real_drained = peerd.session.Session.drained

        async def watched(self: peerd.session.Session) -> None:
            mine = self.me == a.peer_id  # b drains its side too, answering the retire
            if mine:
                draining.set()
            await real_drained(self)
            if mine:
                drained.set()

        monkeypatch.setattr(peerd.session.Session, "drained", watched)
        await a.connect(b.listen_address)
        first = a.session(b.peer_id)
        answers: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                answers.append(await a.call_session(first, "slow"))

            nursery.start_soon(call)
            with trio.fail_after(10):
                await entered.wait()
                await a.connect(b.listen_address)  # a keeps the newer, retires the first
                kept = a._sessions[b.peer_id]
                assert kept is not first
                await draining.wait()  # the retire waits for the slow call
            kept.conn.close(0, "gone")
            await wait_until(lambda: a._sessions.get(b.peer_id) is first)
            release.set()
        with trio.fail_after(10):
            await drained.wait()  # the retire decides right after this, in the same step
        assert answers == [b"done"]
        assert not first.conn.closed, first.conn.close_reason
        assert await a.call(b.peer_id, "echo", b"x") == a.peer_id.raw + b"x"


async def test_a_retired_duplicate_closes_only_after_the_calls_on_it_end() -> None:
    """a dials b twice and retires the first session while b still has a
    slow call and then a one-way message on it: a closes the session only
    after b's call got its answer and the message reached a, and the pair
    stays connected throughout (before: closed after a fixed grace, cutting
    off whatever was still on it)."""
    async with open_node(KEY) as a, open_node(KEY) as b:
        entered, release, noted = trio.Event(), trio.Event(), trio.Event()
        notes: list[bytes] = []

        async def slow(peer: PeerId, payload: bytes) -> bytes:
            entered.set()
            await release.wait()
            return b"late " + payload

        async def note(peer: PeerId, payload: bytes) -> bytes:
            notes.append(payload)
            noted.set()
            return b""

        a.register("slow", slow)
        a.register("note", note)
        lost: list[PeerId] = []
        a.on_peer_lost(lost.append)
        b.on_peer_lost(lost.append)
        await a.connect(b.listen_address)
        await wait_until(lambda: a.peer_id in b._sessions)
        first = b._sessions[a.peer_id]
        answers: list[bytes] = []

        async def slow_call() -> None:
            answers.append(await b.call(a.peer_id, "slow", b"answer", timeout=30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_call)
            await entered.wait()
            await a.connect(b.listen_address)  # a keeps the newer and retires `first`
            await wait_until(lambda: first.retiring)  # b got a's request to retire it
            await b.call_session(first, "note", b"sent while retiring", oneway=True)
            release.set()
        await first.conn.closed_event.wait()
        await noted.wait()
        assert answers == [b"late answer"] and notes == [b"sent while retiring"]
        assert b._sessions[a.peer_id] is not first and b.session(a.peer_id).alive
        assert await b.call(a.peer_id, "note", b"after") == b""
        assert lost == [] and b.peers() == [a.peer_id] and a.peers() == [b.peer_id]


async def test_a_closed_session_in_use_falls_back_to_a_live_duplicate_at_once() -> None:
    """The session in use closes (as a duplicate, from the far side) while a
    duplicate lives: calls made before this node's session task has promoted
    the survivor already go on it, so nobody sees the peer missing."""
    async with open_node(KEY) as a, open_node(KEY) as b:
        a.register("echo", echo)
        await a.connect(b.listen_address)
        await a.connect(b.listen_address)
        await wait_until(lambda: len(b._spares.get(a.peer_id, [])) == 1)
        in_use, (spare,) = b._sessions[a.peer_id], b._spares[a.peer_id]
        in_use.conn.close(0, "duplicate session")
        assert b.peers() == [a.peer_id]  # no await yet: nothing was promoted
        assert b.session(a.peer_id) is spare
        assert await b.call(a.peer_id, "echo", b"x") == b.peer_id.raw + b"x"


async def test_a_wait_for_a_data_link_outlives_a_duplicate_session_closing() -> None:
    """b waits for a's data link on the one session between them; a dials b
    again and retires that first session as a duplicate. a is still there on
    the other one, so b's wait goes on and gets the link (before: ``PeerLost
    ("session closed")``, which failed an all-reduce in a swarm just started,
    about 1 run in 10)."""
    async with open_node(KEY) as a, open_node(KEY) as b:
        await a.connect(b.listen_address)
        await wait_until(lambda: a.peer_id in b._sessions)
        first = b._sessions[a.peer_id]
        link: list[Any] = []

        async def accept() -> None:
            link.append(await b.accept_data_channels(a.peer_id, "dup"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            await trio.testing.wait_all_tasks_blocked()
            await a.connect(b.listen_address)  # a keeps the newer and retires `first`
            await wait_until(lambda: first.conn.closed)
            await trio.testing.wait_all_tasks_blocked()
            assert not link  # still waiting, not failed
            out = await a.open_data_channels(b.peer_id, 1, purpose="dup")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.send, b"k", b"over the survivor")
            assert await link[0].receive(b"k") == b"over the survivor"


async def test_a_restarted_peer_replaces_its_old_session_at_once() -> None:
    """b's process is replaced by a new one with the same identity before a
    noticed the old one die: a's calls must reach the new process at once,
    not the stale session until the QUIC idle timeout."""
    ident = Identity.generate()
    async with open_node(KEY) as a, open_node(KEY, identity=ident) as old:
        async def old_life(peer: PeerId, payload: bytes) -> bytes:
            return b"old"

        async def new_life(peer: PeerId, payload: bytes) -> bytes:
            return b"new"

        old.register("life", old_life)
        await old.connect(a.listen_address)
        assert await a.call(ident.peer_id, "life") == b"old"
        async with open_node(KEY, identity=ident) as new:
            new.register("life", new_life)
            await new.connect(a.listen_address)
            assert await a.call(ident.peer_id, "life") == b"new"
            assert a.peers() == [ident.peer_id]


async def test_a_restarted_peer_replaces_the_session_we_dialled_to_its_old_process() -> None:
    """As above, but a dialled the old process and has the lower id, so the tie
    rule between duplicates alone would keep a's session to the dead process and
    retire the new one. The new process's handshake carries a new incarnation:
    a drops the old session at once and tells its parts the old process is gone."""
    a_ident = Identity.generate()
    ident = next(i for i in (Identity.generate() for _ in range(200))
                 if a_ident.peer_id.raw < i.peer_id.raw)

    async def old_life(peer: PeerId, payload: bytes) -> bytes:
        return b"old"

    async def new_life(peer: PeerId, payload: bytes) -> bytes:
        return b"new"

    async with open_node(KEY, identity=a_ident) as a, open_node(KEY, identity=ident) as old:
        old.register("life", old_life)
        await a.connect(old.listen_address)
        assert await a.call(ident.peer_id, "life") == b"old"
        lost: list[PeerId] = []
        a.on_peer_lost(lost.append)
        async with open_node(KEY, identity=ident) as new:
            new.register("life", new_life)
            await new.connect(a.listen_address)
            assert await a.call(ident.peer_id, "life") == b"new"
            assert lost == [ident.peer_id]
            assert a._spares.get(ident.peer_id, []) == [] and a.peers() == [ident.peer_id]


async def test_wrong_swarm_key_rejected_both_ways_and_no_handler_runs() -> None:
    ran: list[PeerId] = []

    async def spy(peer: PeerId, payload: bytes) -> bytes:
        ran.append(peer)
        return b""

    async with open_node(KEY) as member, open_node(SwarmKey(b"w" * 32)) as stranger:
        member.register("spy", spy)
        stranger.register("spy", spy)
        with pytest.raises(AuthError):
            await stranger.connect(member.listen_address)
        with pytest.raises(AuthError):
            await member.connect(stranger.listen_address)
        assert member.peers() == [] and stranger.peers() == []
        await wait_until(lambda: member.statistics().handshakes_failed == 2)
        assert ran == []


async def test_expect_peer_id_mismatch() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        with pytest.raises(AuthError, match="expected"):
            await a.connect(b.listen_address, expect=Identity.generate().peer_id)


async def test_replayed_handshake_rejected_over_network() -> None:
    async with open_node(KEY) as server, open_node(KEY) as attacker:
        victim = Identity.generate()

        async def manual(hello: bytes | None, finish: bytes | None) -> tuple[bytes, bytes]:
            conn = attacker.endpoint.connect(server.listen_address)
            await _wait_or_closed(conn)
            hs = ClientHandshake(victim, KEY, peer_certificate_key(conn.quic))
            stream = conn.open_stream()
            hello = hello or hs.hello()
            await stream.send_frame(hello)
            server_hello = await stream.receive_frame()
            finish = finish or hs.on_server_hello(server_hello)
            await stream.send_frame(finish)
            await stream.receive_frame()  # Accept, or PeerLost when refused
            return hello, finish

        hello, finish = await manual(None, None)  # the victim's genuine handshake
        with trio.fail_after(5), pytest.raises(PeerdError):
            await manual(hello, finish)  # the attacker replays it
        assert server.statistics().handshakes_failed == 1


async def test_rpc_errors_deadlines_cancellation_limits() -> None:
    cancelled = trio.Event()
    started = trio.Event()

    async def slow(peer: PeerId, payload: bytes) -> bytes:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        return b""  # pragma: no cover

    async def bad(peer: PeerId, payload: bytes) -> bytes:
        raise AuthError("you may not")

    async def crash(peer: PeerId, payload: bytes) -> bytes:
        raise KeyError("internal detail")

    cfg = NodeConfig(rpc=RpcLimits(max_message=1024, max_concurrent_calls=2))
    async with open_node(KEY, config=cfg) as a, open_node(KEY, config=cfg) as b:
        for name, h in [("slow", slow), ("bad", bad), ("crash", crash), ("echo", echo)]:
            b.register(name, h)
        await a.connect(b.listen_address)
        with pytest.raises(RemoteError) as err:
            await a.call(b.peer_id, "bad")
        assert err.value.kind == "AuthError" and "may not" in err.value.message
        with pytest.raises(RemoteError) as err:
            await a.call(b.peer_id, "crash")
        assert err.value.kind == "InternalError" and "internal detail" not in str(err.value)
        with pytest.raises(RemoteError) as err:
            await a.call(b.peer_id, "nope")
        assert err.value.kind == "NoSuchMethod"
        with pytest.raises(Timeout):
            await a.call(b.peer_id, "slow", timeout=0.3)
        with trio.fail_after(5):
            await cancelled.wait()  # the caller's timeout cancelled the remote handler
        with pytest.raises(PeerdError, match="exceeds"):
            await a.call(b.peer_id, "echo", b"x" * 2000)
        # Two slow calls fill the per-peer slots; the third is refused as Busy.
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                started = trio.Event()
                nursery.start_soon(lambda: a.call(b.peer_id, "slow", timeout=2))
                await started.wait()
            with pytest.raises(RemoteError) as err:
                await a.call(b.peer_id, "echo", b"z")
            assert err.value.kind == "Busy"
            nursery.cancel_scope.cancel()
        # Slots free up once the resets reach b and cancel its handlers.
        with trio.fail_after(5):
            while True:
                try:
                    assert await a.call(b.peer_id, "echo", b"ok") == a.peer_id.raw + b"ok"
                    break
                except RemoteError as exc:
                    assert exc.kind == "Busy"
                    await trio.sleep(0.01)


async def test_udp_garbage_leaves_node_serving() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        b.register("echo", echo)
        await a.connect(b.listen_address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rng = os.urandom
            for i in range(300):
                first = bytes([0xC0 | (i % 64)]) if i % 2 else bytes([i % 64])
                size = 1200 if i % 3 == 0 else 1 + i
                sock.sendto(first + rng(size), b.listen_address)
            sock.sendto(b"", b.listen_address)
        finally:
            sock.close()
        with trio.fail_after(10):
            for _ in range(20):
                assert await a.call(b.peer_id, "echo", b"still") == a.peer_id.raw + b"still"
        stats = b.statistics()
        assert stats.quic_garbage_dropped > 0 or stats.handshakes_failed >= 0
        assert stats.peers == 1


def _initial(version: int) -> bytes:
    """A well-formed 1200-byte Initial header of ``version``, garbage after it."""
    head = (bytes([0xC0]) + struct.pack("!I", version) + bytes([8]) + os.urandom(8)
            + bytes([8]) + os.urandom(8) + bytes([0]))
    rest = 1200 - len(head) - 2
    return head + struct.pack("!H", 0x4000 | rest) + os.urandom(rest)


async def test_initial_of_an_unknown_version_is_answered_and_kills_nothing() -> None:
    # One such datagram from anyone ended the node: aioquic kept no network
    # path for it, and the endpoint's next send raised IndexError.
    async with open_node(KEY) as a, open_node(KEY) as b:
        b.register("echo", echo)
        await a.connect(b.listen_address)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            for version in (0x1A2A3A4A, 0xFF00001D, 0x00000002):
                await sock.sendto(_initial(version), b.listen_address)
                with trio.fail_after(5):
                    reply = await sock.recv(2048)
                header = pull_quic_header(Buffer(data=reply), host_cid_length=8)
                assert header.packet_type == QuicPacketType.VERSION_NEGOTIATION
                assert 1 in header.supported_versions  # QUIC v1, what peerd speaks
        with trio.fail_after(10):
            assert await a.call(b.peer_id, "echo", b"still") == a.peer_id.raw + b"still"
        assert b.endpoint.counters["version_negotiations"] == 3
        assert b.statistics().peers == 1


async def test_a_connection_aioquic_cannot_send_from_ends_alone() -> None:
    async with open_node(KEY) as a, open_node(KEY) as b:
        b.register("echo", echo)
        await a.connect(b.listen_address)
        conn = a.session(b.peer_id).conn

        def broken(now: float) -> list[tuple[bytes, tuple[str, int]]]:
            raise IndexError("list index out of range")

        conn.quic.datagrams_to_send = broken  # type: ignore[method-assign]
        conn.transmit()
        assert conn.closed and conn.close_reason == "internal error on send: IndexError"
        # The endpoint and the node go on: a new session carries calls.
        await a.connect(b.listen_address)
        with trio.fail_after(10):
            assert await a.call(b.peer_id, "echo", b"again") == a.peer_id.raw + b"again"


async def test_pending_handshake_cap_and_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peerd.session, "HANDSHAKE_TIMEOUT", 0.5)
    cfg = NodeConfig(max_pending_handshakes=2)
    async with open_node(KEY, config=cfg) as server, open_node(KEY) as client:
        # Three connections complete TLS but never start our handshake.
        stalled = [client.endpoint.connect(server.listen_address) for _ in range(3)]
        with trio.fail_after(5):
            for conn in stalled[:2]:
                await conn.handshake_done.wait()
        assert server.statistics().pending_handshakes == 2
        assert server.statistics().quic_pending_cap_dropped > 0
        stalled[2].close()  # stop its Initial retransmissions: it would be admitted later
        with trio.fail_after(10):
            for conn in stalled[:2]:
                await conn.closed_event.wait()  # evicted at the handshake deadline
        assert server.statistics().pending_handshakes == 0
        with trio.fail_after(5):
            assert await client.connect(server.listen_address) == server.peer_id


async def test_peer_lost_callback_on_close() -> None:
    lost: list[PeerId] = []
    gone = trio.Event()
    async with open_node(KEY) as a:
        def on_lost(p: PeerId) -> None:
            lost.append(p)
            gone.set()
        a.on_peer_lost(on_lost)
        async with open_node(KEY) as b:
            await a.connect(b.listen_address)
        with trio.fail_after(10):
            await gone.wait()
        assert lost == [b.peer_id]


async def test_aioquic_private_accessors_still_work() -> None:
    """peerd reads private aioquic attributes in one place each; pin them."""
    from peerd.quic import stream_backlog

    async with open_node(KEY) as a, open_node(KEY) as b:
        conn = a.endpoint.connect(b.listen_address)
        with trio.fail_after(5):
            await _wait_or_closed(conn)
        assert peer_certificate_key(conn.quic) == b.identity.public_key
        stream = conn.open_stream()
        conn.quic.send_stream_data(stream.stream_id, b"x" * 5000)
        assert stream_backlog(conn.quic, stream.stream_id) == 5000
        stream.reset()
        assert stream_backlog(conn.quic, stream.stream_id) == 0  # never to be sent
        conn.close()
