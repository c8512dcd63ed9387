"""Hostile outsiders and a malicious member, while the members all-reduce."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import trio

from peerd.identity import SwarmKey
from peerd.node import open_node
from peerd.peerproc import LocalSwarm, PeerProcess
from peerd.rpc import RpcRequest
from peerd.wire import FRAME_HEADER, encode
from tests.chaos.harness import peer_factory, quiet_env
from tests.chaos.hostile import Disturber

SIZE = 20_000
# A window is at least this many rounds and lasts at least this long: long
# enough for the outsider to get its quota of garbage in however fast the
# rounds go (at ~50 rounds/s, six rounds took a tenth of a second).
WINDOW_ROUNDS = 6
WINDOW_SECONDS = 1.0
ROUNDS_APART = 1000  # round numbers reserved per window


def _window(sw: LocalSwarm, first_round: int) -> float:
    """Rounds per second over one window; every round checked against the reference."""
    t0 = time.monotonic()
    rnd = first_round
    while rnd - first_round < WINDOW_ROUNDS or time.monotonic() - t0 < WINDOW_SECONDS:
        assert rnd - first_round < ROUNDS_APART
        res = sw.all_reduce(sw.peers, size=SIZE, seed=11, round=rnd, timeout=90)
        assert all(r["event"] == "result" for r in res), res
        assert len({r["sha256"] for r in res}) == 1
        assert all(len(r["participants"]) == len(sw.peers) for r in res)
        rnd += 1
    return (rnd - first_round) / (time.monotonic() - t0)


def _stats(p: PeerProcess) -> dict[str, Any]:
    return p.request(cmd="node_stats")


def test_outsiders_are_dropped_and_throughput_holds() -> None:
    with LocalSwarm(3, factory=peer_factory) as sw:
        target = sw.peers[0]
        outsider = PeerProcess(os.urandom(32).hex(), 99, env=quiet_env())
        try:
            before = _stats(target)
            dist = Disturber(outsider, target.addr, before["data_port"], seed=1)
            _window(sw, 0)  # warm: data links open, caches filled
            calm: list[float] = []
            noisy: list[float] = []
            rnd = ROUNDS_APART
            for _ in range(5):  # interleaved, so load drift on the host hits both alike
                calm.append(_window(sw, rnd))
                rnd += ROUNDS_APART
                dist.start()
                try:
                    noisy.append(_window(sw, rnd))
                finally:
                    dist.stop()
                rnd += ROUNDS_APART
            after = _stats(target)
        finally:
            outsider.stop()
    c = dist.counts
    print(f"\nundisturbed {statistics.median(calm):.2f} rounds/s, disturbed "
          f"{statistics.median(noisy):.2f} rounds/s; outsider handshakes {c.handshakes}, "
          f"datagrams {c.datagrams}, tcp {c.tcp}")
    assert c.handshakes >= 3 and c.datagrams >= 100 and c.tcp >= 5
    assert c.admitted == 0 and set(c.handshake_errors) <= {"AuthError", "Timeout", "PeerLost"}
    # No outsider was ever admitted, so no handler could run for it.
    assert after["handshakes_ok"] == before["handshakes_ok"]
    assert after["peers"] == before["peers"] == 2
    assert after["handshakes_failed"] - before["handshakes_failed"] >= c.handshakes // 2
    assert after["quic_garbage_dropped"] > before["quic_garbage_dropped"]
    assert statistics.median(noisy) >= 0.8 * statistics.median(calm), (calm, noisy)


async def test_malicious_member_gets_errors_and_harms_no_one() -> None:
    sw: LocalSwarm = await trio.to_thread.run_sync(lambda: LocalSwarm(3, factory=peer_factory))
    try:
        victim = sw.peers[0]
        before = await trio.to_thread.run_sync(_stats, victim)
        async with open_node(SwarmKey(bytes.fromhex(sw.key_hex))) as node:
            peer = await node.connect(victim.addr)
            session = node.session(peer)
            # 1: bytes that are no frame at all; 2: a frame header claiming 2 GiB;
            # 3: a frame whose body is not msgpack.
            for blob in (os.urandom(64), FRAME_HEADER.pack(2**31) + b"x" * 100,
                         FRAME_HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1"):
                stream = session.conn.open_stream()
                await stream.send(blob, end=True)
            # Well-formed requests for a missing method and with a garbage payload
            # are answered with errors, not crashes.
            errors = []
            for method, payload in (("no.such.method", b""),
                                    ("peerd.data.open", os.urandom(300)),
                                    ("peerd.nat.info", b"\xff" * 50)):
                try:
                    await node.call(peer, method, payload, timeout=20)
                except Exception as exc:
                    errors.append(type(exc).__name__)
            # An oversized request is refused by our own client before it leaves.
            stream = session.conn.open_stream()
            body = encode(RpcRequest("peerd.nat.info", 10_000, False, b""))
            await stream.send(FRAME_HEADER.pack(64 * 1024 * 1024) + body, end=True)
            with trio.fail_after(30):
                while (await trio.to_thread.run_sync(_stats, victim))["rpc_bad"] < \
                        before["rpc_bad"] + 4:
                    await trio.sleep(0.2)
        assert errors and all(e == "RemoteError" for e in errors), errors
        after = await trio.to_thread.run_sync(_stats, victim)
        assert after["rpc_bad"] >= before["rpc_bad"] + 4
        # The members go on, correct and bit-identical.
        res = await trio.to_thread.run_sync(
            lambda: sw.all_reduce(sw.peers, size=5000, seed=2, round=0, timeout=90))
        assert all(r["event"] == "result" for r in res), res
        assert len({r["sha256"] for r in res}) == 1
        assert sorted(res[0]["participants"]) == sorted(p.peer for p in sw.peers)
    finally:
        await trio.to_thread.run_sync(sw.close)
