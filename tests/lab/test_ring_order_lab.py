"""The measured ring order on real links (marked ``lab``): four peer processes
in network namespaces, two links of the id-sorted ring shaped to 100 Mbit/s
with tc while every other link runs at veth speed. Each peer's own probes
must tell the slow links from the fast ones, and the next view's ring must
leave both slow links out, with the all-reduce on it still exact.

The in-memory version of this test (tests/collectives/test_membership.py)
checks the decision logic; this one checks the measurement: a probe that
timed connection set-up instead of the transfer could not see a 100 Mbit/s
link among fast ones, and the ring would stay in id order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from peerd.peerproc import LocalSwarm, PeerProcess
from tests.lab.netns import Lab, Node

pytestmark = pytest.mark.lab

PEERS = 4
SLOW_RATE = "100mbit"
SLOW_BYTES_PER_S = 100e6 / 8
PROBED_WITHIN = 60.0  # seconds for every peer to have probed every other
SIZE = 300_001  # fp32 elements: several sub-chunks per ring chunk, odd length


def _probed(sw: LocalSwarm) -> list[dict[str, float]]:
    """Every peer's measured bandwidth to each other member, once all are known."""
    deadline = time.monotonic() + PROBED_WITHIN
    while True:
        readings = [p.request(cmd="links", run=sw.run)["bandwidth"] for p in sw.peers]
        if all(len(r) == PEERS - 1 and all(r.values()) for r in readings):
            return readings
        if time.monotonic() > deadline:
            raise AssertionError(f"links not probed within {PROBED_WITHIN}s: {readings}")
        time.sleep(0.2)  # probes run inside the peers; there is no event to wait on here


def test_ring_leaves_out_links_measured_slow(lab: Lab, tmp_path: Path) -> None:
    hosts: list[Node] = []
    procs: list[PeerProcess] = []
    slow: set[frozenset[str]] = set()

    def factory(key_hex: str, index: int) -> PeerProcess:
        host = lab.public_host(f"r{index}")
        hosts.append(host)
        proc = PeerProcess(key_hex, index, listen=f"{host.ip}:0",
                           prefix=["ip", "netns", "exec", host.ns])
        procs.append(proc)
        if index == PEERS - 1:
            # Every id is known now and no peer has connected yet (so none has
            # probed): slow down two opposite hops of the id-sorted ring, the
            # order a view takes when nothing is measured.
            order = sorted(range(PEERS), key=lambda i: procs[i].peer)
            for a, b in ((order[0], order[1]), (order[2], order[3])):
                lab.limit_rate_to(hosts[a], [hosts[b]], SLOW_RATE)
                lab.limit_rate_to(hosts[b], [hosts[a]], SLOW_RATE)
                slow.add(frozenset((procs[a].peer, procs[b].peer)))
        return proc

    with LocalSwarm(PEERS, run="ringorder", factory=factory) as sw:
        readings = _probed(sw)
        for p, bandwidth in zip(sw.peers, readings, strict=True):
            fast = [bw for q, bw in bandwidth.items() if frozenset((p.peer, q)) not in slow]
            [slowest] = [bw for q, bw in bandwidth.items() if frozenset((p.peer, q)) in slow]
            # The transfer, not the link's set-up, is what was timed (set-up
            # alone read ~5 MB/s for this link: tests fail without the fix),
            # to within the factor of two that link classes resolve (readings
            # ran up to 1.7x the shaped rate in 2 of 12 runs with two channels
            # per link; not explained: the heartbeat RTT the probe subtracts
            # is one suspect) ...
            assert 0.5 * SLOW_BYTES_PER_S < slowest < 2 * SLOW_BYTES_PER_S, (p.peer, bandwidth)
            # ... and every fast link measured faster.
            assert slowest < min(fast), (p.peer, bandwidth)

        for p in sw.peers:
            p.send(cmd="update_view", run=sw.run)
        rings = [tuple(p.expect("view")["view"]) for p in sw.peers]
        ring = rings[0]
        assert all(r == ring for r in rings)
        assert sorted(ring) == sorted(p.peer for p in sw.peers)
        hops = {frozenset((ring[i], ring[(i + 1) % PEERS])) for i in range(PEERS)}
        assert not hops & slow, (ring, slow)

        results = sw.all_reduce(sw.peers, size=SIZE, seed=5, round=1, out=str(tmp_path))
        assert {r["event"] for r in results} == {"result"}, results
        assert {r["sha256"] for r in results} == {results[0]["sha256"]}
        assert all(tuple(r["participants"]) == ring for r in results)
        expected = sw.reference(list(ring), seed=5, round_=1, size=SIZE)
        for p in sw.peers:
            got = np.load(tmp_path / f"r1_{p.index}.npy")
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
