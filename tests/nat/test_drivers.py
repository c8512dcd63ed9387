"""The trio drivers: punch loop on a fake network (MockClock), real UDP/TCP
punching and the TCP relay on loopback (real clock, a second or less)."""

from __future__ import annotations

import socket as pysocket
from typing import Any

import pytest
import trio
import trio.testing

from nat.endpoint import Endpoint, NatType
from nat.punch import Dial, HolePunch, LocalInfo, PunchConfig, Role
from nat.punch_driver import drive_punch
from nat.punch_tcp import TcpPuncher
from nat.punch_udp import UdpPuncher
from nat.relay import RelayLimits
from nat.relay_tcp import TcpRelay, open_circuit
from peerd.errors import RemoteError

TOKEN = bytes(range(16))
CFG = PunchConfig(max_attempts=3, reply_timeout=1.0, sync_timeout=1.0, punch_timeout=0.5,
                  backoff_initial=5.0)


class MemSignal:
    """One end of a fake relay: messages arrive after ``delay`` seconds."""

    def __init__(self, out: trio.MemorySendChannel[Any], inp: trio.MemoryReceiveChannel[Any],
                 delay: float, nursery: trio.Nursery) -> None:
        self.out, self.inp, self.delay, self.nursery = out, inp, delay, nursery

    async def send(self, msg: Any) -> None:
        async def later() -> None:
            await trio.sleep(self.delay)
            await self.out.send(msg)
        self.nursery.start_soon(later)

    async def receive(self) -> Any:
        return await self.inp.receive()


def signal_pair(nursery: trio.Nursery, delay: float) -> tuple[MemSignal, MemSignal]:
    a_out, b_in = trio.open_memory_channel[Any](16)
    b_out, a_in = trio.open_memory_channel[Any](16)
    return MemSignal(a_out, a_in, delay, nursery), MemSignal(b_out, b_in, delay, nursery)


A = Endpoint("198.51.100.1", 5000)
B = Endpoint("198.51.100.2", 6000)


async def test_driver_succeeds_when_both_sides_dial_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Fake NATs: a direct packet gets through only if the receiver dialed first."""
    dialed: dict[str, float] = {}

    def dialer(me: str, other: str, source: Endpoint):  # type: ignore[no-untyped-def]
        async def dial(action: Dial, found: trio.MemorySendChannel[Endpoint]) -> None:
            async with found:
                dialed[me] = trio.current_time()
                await trio.sleep(0.05)  # one-way direct latency
                if other in dialed and dialed[other] <= trio.current_time():
                    await found.send(action.targets[0])
        return dial

    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        sig_b, sig_a = signal_pair(nursery, delay=0.2)
        b = HolePunch(Role.INITIATOR, LocalInfo((B,), NatType.EASY), TOKEN, CFG)
        a = HolePunch(Role.RESPONDER, LocalInfo((A,), NatType.EASY), TOKEN, CFG)

        async def run(name: str, p: HolePunch, sig: MemSignal, other: str, src: Endpoint) -> None:
            results[name] = await drive_punch(
                p, sig, dialer(name, other, src), deadline=trio.current_time() + 30
            )

        nursery.start_soon(run, "b", b, sig_b, "a", B)
        nursery.start_soon(run, "a", a, sig_a, "b", A)
    assert results["b"].succeeded and results["a"].succeeded
    assert results["b"].remote == A and results["a"].remote == B
    assert results["b"].rtt == pytest.approx(0.4)
    assert dialed["a"] == pytest.approx(dialed["b"])  # synchronised by RTT/2


async def test_driver_gives_up_after_the_configured_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never(action: Dial, found: trio.MemorySendChannel[Endpoint]) -> None:
        async with found:
            pass

    async with trio.open_nursery() as nursery:
        sig_b, sig_a = signal_pair(nursery, delay=0.1)
        b = HolePunch(Role.INITIATOR, LocalInfo((B,), NatType.HARD), TOKEN, CFG)
        a = HolePunch(Role.RESPONDER, LocalInfo((A,), NatType.HARD), TOKEN, CFG)
        nursery.start_soon(drive_punch, a, sig_a, never)
        start = trio.current_time()
        outcome = await drive_punch(b, sig_b, never, max_rounds=1, deadline=start + 60)
        nursery.cancel_scope.cancel()
    assert not outcome.succeeded
    assert outcome.failures == tuple(f"attempt {i}: no direct packet" for i in (1, 2, 3))
    # Each attempt: 0.2 s RTT + 0.1 s wait + 0.5 s punch timeout.
    assert trio.current_time() - start == pytest.approx(3 * 0.8)


async def test_driver_honours_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        sig_b, _ = signal_pair(nursery, delay=0.1)  # nobody answers
        b = HolePunch(Role.INITIATOR, LocalInfo((B,), NatType.EASY), TOKEN, CFG)
        start = trio.current_time()
        outcome = await drive_punch(b, sig_b, lambda a, f: trio.sleep(0), deadline=start + 1.5)
        nursery.cancel_scope.cancel()
    assert not outcome.succeeded and outcome.failures[-1] == "deadline"
    assert trio.current_time() - start == pytest.approx(1.5)


async def _udp_socket() -> tuple[trio.socket.SocketType, Endpoint]:
    sock = trio.socket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    return sock, Endpoint(host, port)


async def test_udp_punch_on_loopback() -> None:
    sa, ea = await _udp_socket()
    sb, eb = await _udp_socket()
    out: dict[str, Any] = {}
    with sa, sb, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sig_b, sig_a = signal_pair(nursery, delay=0.01)
            ub, ua = UdpPuncher(sb, TOKEN), UdpPuncher(sa, TOKEN)
            b = HolePunch(Role.INITIATOR, LocalInfo((eb,), NatType.EASY), TOKEN, CFG)
            a = HolePunch(Role.RESPONDER, LocalInfo((ea,), NatType.EASY), TOKEN, CFG)

            async def run(name: str, p: HolePunch, sig: MemSignal, u: UdpPuncher) -> None:
                out[name] = await drive_punch(
                    p, sig, u.dial, u.listen, deadline=trio.current_time() + 5
                )

            nursery.start_soon(run, "a", a, sig_a, ua)
            nursery.start_soon(run, "b", b, sig_b, ub)
    assert out["b"].succeeded and out["b"].remote == ea
    assert out["a"].succeeded and out["a"].remote == eb
    # Whichever probe lands first is acked; the ack (or the other probe) tells
    # its sender. Who goes first is a race on loopback, so count both sides.
    assert ua.probes_sent + ub.probes_sent > 0
    assert ua.acks_sent + ub.acks_sent > 0


async def test_tcp_punch_on_loopback() -> None:
    ports = []
    for _ in range(2):
        s = pysocket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    pa, pb = ports
    ta, tb = TcpPuncher(pa, TOKEN, 2.0), TcpPuncher(pb, TOKEN, 2.0)
    out: dict[str, Any] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sig_b, sig_a = signal_pair(nursery, delay=0.01)
            b = HolePunch(Role.INITIATOR, LocalInfo((Endpoint("127.0.0.1", pb),), NatType.EASY),
                          TOKEN, CFG)
            a = HolePunch(Role.RESPONDER, LocalInfo((Endpoint("127.0.0.1", pa),), NatType.EASY),
                          TOKEN, CFG)

            async def run(name: str, p: HolePunch, sig: MemSignal, t: TcpPuncher) -> None:
                out[name] = await drive_punch(
                    p, sig, t.dial, t.listen, deadline=trio.current_time() + 5
                )

            nursery.start_soon(run, "a", a, sig_a, ta)
            nursery.start_soon(run, "b", b, sig_b, tb)
    assert out["a"].succeeded and out["b"].succeeded
    assert ta.stream is not None and tb.stream is not None
    async with ta.stream, tb.stream:
        await ta.stream.send_all(b"ping")
        assert await tb.stream.receive_some(4) == b"ping"


async def test_tcp_relay_pairs_forwards_and_refuses() -> None:
    relay = TcpRelay(RelayLimits(max_circuits=1))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay.serve, 0, "127.0.0.1")
            streams: list[trio.SocketStream] = []
            refusals: list[str] = []

            async def join(session: bytes, peer: str) -> None:
                try:
                    streams.append(await open_circuit("127.0.0.1", port, session, peer))
                except RemoteError as exc:
                    refusals.append(exc.message)

            async with trio.open_nursery() as pair:
                pair.start_soon(join, b"s" * 16, "a")
                pair.start_soon(join, b"s" * 16, "b")
            x, y = streams
            await x.send_all(b"hello through the relay")
            got = b""
            while len(got) < 23:
                got += await y.receive_some(100)
            assert got == b"hello through the relay"
            # The only circuit slot is taken: the next pair is refused.
            async with trio.open_nursery() as pair:
                pair.start_soon(join, b"t" * 16, "c")
                pair.start_soon(join, b"t" * 16, "d")
            assert refusals == ["too many circuits"] * 2 and len(streams) == 2
            # Garbage instead of a join only costs the sender its connection.
            junk = await trio.open_tcp_stream("127.0.0.1", port)
            await junk.send_all(b"\x00\x00\x00\x03abc")
            assert await junk.receive_some(10) == b""
            await x.aclose()
            assert await y.receive_some(10) == b""  # the half-close is passed on
            stats = relay.core.statistics()
            assert stats.opened_total == 1 and stats.refused_total == 1
            nursery.cancel_scope.cancel()
