"""Real peerd nodes across every pair of NAT types: the lab layout shared by
``test_node_traversal_lab.py`` and ``benchmarks/nat.py``.

Public nodes p1, p2 (observers and relays for everyone), p3 and p4; EIM
routers e1 (hosts a, a2) and e2 (b); symmetric routers s1 (c, c2) and s2 (d).
Each NATed node connects to p1 and p2 by address, which classifies its NAT.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from netns import Lab, NatKind
from netns import Node as LabHost

from peerd.identity import PeerId
from peerd.peerproc import PeerProcess

# (initiator, target, expected path, expected data route). P: public, E: EIM,
# S: symmetric; "same" pairs sit behind one NAT and talk over their LAN.
EXPECTED = [
    ("p2", "p4", "direct", "direct"),  # P-P: dial the public address
    ("p3", "a", "direct", "reverse"),  # P-E: the NATed side dials the public one
    ("c", "p3", "direct", "direct"),  # S-P
    ("a", "b", "punched", "punch"),  # E-E: UDP punch, TCP simultaneous open for data
    ("a", "a2", "direct", "direct"),  # E-E, same NAT: private addresses
    ("c", "c2", "direct", "direct"),  # S-S, same NAT
    ("a", "c", "relay", "quic"),  # E-S: no punch the node can rely on
    ("d", "b", "relay", "quic"),  # S-E
    ("c", "d", "relay", "quic"),  # S-S
]
NAT_TYPES = {"p1": "public", "p2": "public", "p3": "public", "p4": "public", "a": "easy",
             "a2": "easy", "b": "easy", "c": "hard", "c2": "hard", "d": "hard"}
PAIR_KIND = {("p2", "p4"): "P-P", ("p3", "a"): "P-E", ("c", "p3"): "S-P", ("a", "b"): "E-E",
             ("a", "a2"): "E-E same NAT", ("c", "c2"): "S-S same NAT", ("a", "c"): "E-S",
             ("d", "b"): "S-E", ("c", "d"): "S-S"}


@dataclass
class Swarm:
    lab: Lab
    hosts: dict[str, LabHost]
    procs: dict[str, PeerProcess] = field(default_factory=dict)

    def name_of_short(self, short: str) -> str:
        return next(n for n, p in self.procs.items() if PeerId.parse(p.peer).short == short)

    def connect_fresh(self, src: str, dst: str) -> dict[str, Any]:
        """``connect_peer`` from ``src`` to ``dst`` after closing any session
        between them (DHT traffic may have connected them already)."""
        a, b = self.procs[src], self.procs[dst]
        a.request(cmd="disconnect", peer=b.peer)
        b.request(cmd="disconnect", peer=a.peer)
        return a.request(cmd="connect_peer", peer=b.peer, timeout=60)

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()

    def transfer(self, src: str, dst: str, purpose: str, seed: int, size: int,
                 channels: int = 2) -> dict[str, Any]:
        """Move ``size`` bytes from ``src`` to ``dst`` over a new data link and
        check them; the sender's report plus ``wall`` (driver's seconds)."""
        sender, receiver = self.procs[src], self.procs[dst]
        t0 = time.perf_counter()
        receiver.send(cmd="data_recv", peer=sender.peer, purpose=purpose)
        sent = sender.request(cmd="data_send", peer=receiver.peer, purpose=purpose, seed=seed,
                              size=size, channels=channels, timeout=300)
        got = receiver.expect("received", timeout=300)
        wall = time.perf_counter() - t0
        assert sent["event"] == "sent", sent
        assert got["bytes"] == size and got["sha256"] == sent["sha256"], (sent, got)
        return {**sent, "wall": wall}


def _start(key: str, index: int, host: LabHost) -> PeerProcess:
    return PeerProcess(key, index, env={"PEERD_PEERPROC_NO_TORCH": "1"},
                       listen=f"{host.ip}:0", prefix=["ip", "netns", "exec", host.ns])


def build_swarm(lab: Lab) -> Swarm:
    """Build the layout in ``lab`` and start a connected node on every host.
    The caller closes the swarm (``Swarm.close``) and the lab."""
    hosts = {n: lab.public_host(n) for n in ("p1", "p2", "p3", "p4")}
    e1, e2 = lab.nat("e1", NatKind.EIM), lab.nat("e2", NatKind.EIM)
    s1, s2 = lab.nat("s1", NatKind.SYMMETRIC), lab.nat("s2", NatKind.SYMMETRIC)
    for name, router in (("a", e1), ("a2", e1), ("b", e2), ("c", s1), ("c2", s1), ("d", s2)):
        hosts[name] = lab.host_behind(router, name)
    swarm = Swarm(lab, hosts)
    key = os.urandom(32).hex()
    try:
        with ThreadPoolExecutor(len(hosts)) as pool:
            futures = {n: pool.submit(_start, key, i, h) for i, (n, h) in enumerate(hosts.items())}
            for n, f in futures.items():
                swarm.procs[n] = f.result()
        procs = swarm.procs
        # Two observers each for the public nodes' own classification; p2 and
        # p4 stay apart so that P-P exercises a dial by id.
        for name, seeds in (("p1", ("p2", "p3")), ("p2", ("p1", "p3")), ("p3", ("p1", "p2")),
                            ("p4", ("p1", "p3")), *((n, ("p1", "p2")) for n in
                                                     ("a", "a2", "b", "c", "c2", "d"))):
            for seed in seeds:
                reply = procs[name].request(cmd="connect", addr=procs[seed].addr)
                assert reply["event"] == "connected", reply
    except BaseException:
        swarm.close()
        raise
    return swarm
