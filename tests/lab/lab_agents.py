"""Programs the lab runs inside namespaces (via ``Lab.spawn_py``/``run_py``).

Each is a top-level function with JSON-able arguments and result. Long-running
services print ``LAB-READY`` once bound so the test waits on an event, not a
sleep. Every loop is bounded by a count or a deadline.
"""

from __future__ import annotations

import json
import socket as pysocket
from typing import Any

import trio

from nat.classify import classify
from nat.endpoint import Endpoint
from nat.framed import FramedStream
from nat.observed import ObservedAddresses
from nat.punch import HolePunch, LocalInfo, PunchConfig, Role
from nat.punch_driver import drive_punch
from nat.punch_tcp import TcpPuncher, reuse_socket
from nat.punch_udp import UdpPuncher
from nat.relay import RelayLimits
from nat.relay_tcp import TcpRelay, open_circuit

READY = "LAB-READY"
MAX_PACKETS = 10_000


def ready() -> None:
    print(READY, flush=True)


def _udp(port: int) -> trio.socket.SocketType:
    return trio.socket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM)


# ---------------------------------------------------------------- observers


async def observer(port: int, lifetime: float) -> int:
    """Tell every UDP sender / TCP client the source address it was seen from."""
    served = 0
    udp = _udp(port)
    await udp.bind(("0.0.0.0", port))
    tcp = reuse_socket(port)
    await tcp.bind(("0.0.0.0", port))
    tcp.listen(64)

    async def serve_udp() -> None:
        nonlocal served
        for _ in range(MAX_PACKETS):
            _, addr = await udp.recvfrom(2048)
            await udp.sendto(json.dumps([addr[0], addr[1]]).encode(), addr)
            served += 1

    async def serve_tcp() -> None:
        nonlocal served
        for _ in range(MAX_PACKETS):
            conn, addr = await tcp.accept()
            with conn:
                await conn.send(json.dumps([addr[0], addr[1]]).encode())
            served += 1

    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_udp)
            nursery.start_soon(serve_tcp)
            ready()
    return served


async def _observe_udp(sock: trio.socket.SocketType, observers: list[list[Any]]) -> list[list[Any]]:
    out = []
    for ip, port in observers:
        with trio.fail_after(5):
            for _ in range(50):  # one resend per 100 ms until the observer answers
                await sock.sendto(b"who-am-i", (ip, port))
                with trio.move_on_after(0.1):
                    data, addr = await sock.recvfrom(2048)
                    if (addr[0], addr[1]) == (ip, port):
                        seen_ip, seen_port = json.loads(data)
                        out.append([ip, port, seen_ip, seen_port])
                        break
    return out


async def _observe_tcp(local_port: int, observers: list[list[Any]]) -> list[list[Any]]:
    out = []
    for ip, port in observers:
        sock = reuse_socket(local_port)
        await sock.bind(("0.0.0.0", local_port))
        with trio.fail_after(5), sock:
            await sock.connect((ip, port))
            seen_ip, seen_port = json.loads(await sock.recv(2048))
        out.append([ip, port, seen_ip, seen_port])
    return out


async def observe(local_port: int, observers: list[list[Any]], proto: str = "udp") -> list[Any]:
    """What each observer saw of ``local_port``: [obs_ip, obs_port, seen_ip, seen_port]."""
    if proto == "tcp":
        return await _observe_tcp(local_port, observers)
    sock = _udp(local_port)
    with sock:
        await sock.bind(("0.0.0.0", local_port))
        return await _observe_udp(sock, observers)


# ---------------------------------------------------------------- filtering


async def filter_probe(local_port: int, contact: list[Any], wait: float) -> list[list[Any]]:
    """Contact one endpoint, then report every source that reached us."""
    sock = _udp(local_port)
    sources: list[list[Any]] = []
    with sock:
        await sock.bind(("0.0.0.0", local_port))
        await sock.sendto(b"hello", (contact[0], contact[1]))
        ready()
        with trio.move_on_after(wait):
            for _ in range(MAX_PACKETS):
                _, addr = await sock.recvfrom(2048)
                if [addr[0], addr[1]] not in sources:
                    sources.append([addr[0], addr[1]])
    return sources


async def send_udp(src_port: int, target: list[Any], count: int) -> int:
    sock = _udp(src_port)
    with sock:
        await sock.bind(("0.0.0.0", src_port))
        for i in range(count):
            await sock.sendto(b"unsolicited %d" % i, (target[0], target[1]))
            await trio.sleep(0.002)  # pace a little: no socket-buffer drops on the receiver
    return count


async def count_udp(port: int, max_wait: float) -> int:
    """Count datagrams arriving on ``port`` until a ``stop`` datagram arrives
    from loopback (see ``stop_udp``) or ``max_wait`` passes."""
    sock = _udp(port)
    n = 0
    with sock:
        await sock.bind(("0.0.0.0", port))
        ready()
        with trio.move_on_after(max_wait):
            for _ in range(MAX_PACKETS):
                data, addr = await sock.recvfrom(2048)
                if data == b"stop" and addr[0] == "127.0.0.1":
                    break
                n += 1
    return n


async def stop_udp(port: int) -> None:
    sock = _udp(0)
    with sock:
        await sock.sendto(b"stop", ("127.0.0.1", port))


# ---------------------------------------------------------------- relay


async def relay_server(port: int, lifetime: float, circuit_rate: float) -> dict[str, int]:
    relay = TcpRelay(RelayLimits(circuit_rate=circuit_rate, circuit_burst=64 * 1024,
                                 total_rate=4 * circuit_rate, total_burst=256 * 1024))
    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve, port)
            ready()
    s = relay.core.statistics()
    return {"opened": s.opened_total, "bytes": s.bytes_total}


async def relay_transfer(
    relay: list[Any], session_hex: str, name: str, send_bytes: int, expect_bytes: int
) -> dict[str, Any]:
    """Send ``send_bytes`` through a relay circuit while reading ``expect_bytes``
    from the partner; returns what arrived and how long it took."""
    stream = await open_circuit(relay[0], relay[1], bytes.fromhex(session_hex), name)
    start = trio.current_time()
    got = 0
    async with stream, trio.open_nursery() as nursery:
        async def sender() -> None:
            chunk = bytes(min(send_bytes, 1 << 20))
            left = send_bytes
            while left > 0:
                await stream.send_all(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
            await stream.send_eof()

        nursery.start_soon(sender)
        with trio.fail_after(60):
            while got < expect_bytes:
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                got += len(data)
    return {"received": got, "seconds": trio.current_time() - start}


# ---------------------------------------------------------------- punching


def _local_info(local: Endpoint, rows: list[list[Any]]) -> tuple[LocalInfo, str, str | None]:
    book = ObservedAddresses()
    for i, (oip, oport, sip, sport) in enumerate(rows):
        book.record(Endpoint(oip, oport), Endpoint(sip, sport), float(i))
    obs = book.observations(float(len(rows)))
    c = classify([local], obs)
    public = book.confirmed(float(len(rows)))
    if not public and obs:  # a hard NAT: the last mapping is all we can offer
        public = (obs[-1].observed,)
    info = LocalInfo((local, *public), c.nat_type, c.port_step or 0)
    return info, c.nat_type.name, c.public_ip


async def punch_agent(proto: str, role: str, relay: list[Any], session_hex: str,
                      local_port: int, observers: list[list[Any]], lan_ip: str,
                      attempts: int) -> dict[str, Any]:
    """Observe our address, classify, then punch to the partner that joined
    the same relay session; on success exchange one message directly."""
    local = Endpoint(lan_ip, local_port)
    token = bytes.fromhex(session_hex)
    cfg = PunchConfig(max_attempts=attempts, reply_timeout=3.0, sync_timeout=3.0,
                      punch_timeout=1.0 if proto == "udp" else 4.0)
    sock = _udp(local_port)
    with sock:
        await sock.bind(("0.0.0.0", local_port))
        if proto == "udp":
            rows = await _observe_udp(sock, observers)
        else:
            rows = await _observe_tcp(local_port, observers)
        info, nat_name, public_ip = _local_info(local, rows)
        framed = FramedStream(await open_circuit(relay[0], relay[1], token, f"{role}-{lan_ip}"))
        punch = HolePunch(Role(role), info, token, cfg)
        started = trio.current_time()
        async with framed.stream:
            if proto == "udp":
                udp = UdpPuncher(sock, token)
                outcome = await drive_punch(punch, framed, udp.dial, udp.listen, max_rounds=1,
                                            deadline=trio.current_time() + 30)
                punch_seconds = trio.current_time() - started
                data_ok = outcome.succeeded and await _udp_exchange(sock, outcome.remote, role)
            else:
                tcp = TcpPuncher(local_port, token, cfg.punch_timeout)
                outcome = await drive_punch(punch, framed, tcp.dial, tcp.listen, max_rounds=1,
                                            deadline=trio.current_time() + 40)
                punch_seconds = trio.current_time() - started
                data_ok = outcome.succeeded and await _tcp_exchange(tcp, role)
    return {
        "succeeded": outcome.succeeded,
        "remote": str(outcome.remote) if outcome.remote else None,
        "attempt": outcome.attempt,
        "failures": list(outcome.failures),
        "nat_type": nat_name,
        "public_ip": public_ip,
        "candidates": [str(c) for c in info.candidates],
        "data_ok": data_ok,
        "punch_seconds": punch_seconds,
    }


async def _udp_exchange(sock: trio.socket.SocketType, remote: Endpoint | None, role: str) -> bool:
    """Send our name over the punched path until the partner's arrives."""
    assert remote is not None
    mine, theirs = f"data:{role}".encode(), b"data:"
    with trio.move_on_after(5):
        for _ in range(50):
            await sock.sendto(mine, remote.as_tuple())
            with trio.move_on_after(0.1):
                while True:
                    data, addr = await sock.recvfrom(2048)
                    if data.startswith(theirs) and data != mine:
                        # Keep answering briefly so the partner gets ours too.
                        for _ in range(3):
                            await sock.sendto(mine, remote.as_tuple())
                        return (addr[0], addr[1]) == remote.as_tuple()
    return False


async def _tcp_exchange(tcp: TcpPuncher, role: str) -> bool:
    assert tcp.stream is not None
    async with tcp.stream:
        with trio.move_on_after(5):
            await tcp.stream.send_all(f"data:{role}\n".encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = await tcp.stream.receive_some(64)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"data:") and data != f"data:{role}\n".encode()
    return False


# ---------------------------------------------------------------- throughput


async def tcp_sink(port: int, max_wait: float) -> int:
    """Accept one connection and count its bytes until it closes."""
    listener = reuse_socket(port)
    await listener.bind(("0.0.0.0", port))
    listener.listen(1)
    total = 0
    with listener:
        ready()
        with trio.move_on_after(max_wait):
            conn, _ = await listener.accept()
            with conn:
                for _ in range(10_000_000):
                    data = await conn.recv(65536)
                    if not data:
                        break
                    total += len(data)
    return total


async def tcp_source(target: list[Any], nbytes: int) -> float:
    """Send ``nbytes`` and return the seconds until the peer has them all."""
    stream = await trio.open_tcp_stream(target[0], target[1])
    start = trio.current_time()
    async with stream:
        await stream.send_all(bytes(nbytes))
        await stream.send_eof()
        await stream.receive_some(1)  # the sink closes after reading everything
    return trio.current_time() - start
