"""Real peerd nodes reach each other by peer id across every pair of NAT types.

One lab for the module: public nodes p1, p2 (observers and relays for
everyone), p3 and p4; EIM routers e1 (hosts a, a2) and e2 (b); symmetric routers
s1 (c, c2) and s2 (d). Each NATed node connects to p1 and p2 by address, which
classifies its NAT; then ``connect_peer`` must find the path in ``EXPECTED``,
both ends must report it, and a data link must carry bytes intact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from conftest import require_lab
from netns import Lab, NatKind
from netns import Node as LabHost

from peerd.identity import PeerId
from peerd.peerproc import PeerProcess

pytestmark = pytest.mark.lab

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
DATA_BYTES = 2_000_000


@dataclass
class Swarm:
    lab: Lab
    hosts: dict[str, LabHost]
    procs: dict[str, PeerProcess]

    def name_of_short(self, short: str) -> str:
        return next(n for n, p in self.procs.items() if PeerId.parse(p.peer).short == short)


def _start(key: str, index: int, host: LabHost) -> PeerProcess:
    return PeerProcess(key, index, env={"PEERD_PEERPROC_NO_TORCH": "1"},
                       listen=f"{host.ip}:0", prefix=["ip", "netns", "exec", host.ns])


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    require_lab()
    lab = Lab()
    procs: dict[str, PeerProcess] = {}
    try:
        hosts = {n: lab.public_host(n) for n in ("p1", "p2", "p3", "p4")}
        e1, e2 = lab.nat("e1", NatKind.EIM), lab.nat("e2", NatKind.EIM)
        s1, s2 = lab.nat("s1", NatKind.SYMMETRIC), lab.nat("s2", NatKind.SYMMETRIC)
        for name, router in (("a", e1), ("a2", e1), ("b", e2), ("c", s1), ("c2", s1),
                             ("d", s2)):
            hosts[name] = lab.host_behind(router, name)
        key = os.urandom(32).hex()
        with ThreadPoolExecutor(len(hosts)) as pool:
            futures = {n: pool.submit(_start, key, i, h) for i, (n, h) in enumerate(hosts.items())}
            procs.update({n: f.result() for n, f in futures.items()})
        # Two observers each for the public nodes' own classification; p2 and
        # p4 stay apart so that P-P exercises a dial by id.
        for name, seeds in (("p2", ("p1", "p3")), ("p3", ("p1", "p2")), ("p4", ("p1", "p3"))):
            for seed in seeds:
                procs[name].request(cmd="connect", addr=procs[seed].addr)
        for name in ("a", "a2", "b", "c", "c2", "d"):
            for seed in ("p1", "p2"):
                reply = procs[name].request(cmd="connect", addr=procs[seed].addr)
                assert reply["event"] == "connected", reply
        for seed in ("p2", "p3"):  # observers for p1's own classification
            procs["p1"].request(cmd="connect", addr=procs[seed].addr)
        yield Swarm(lab, hosts, procs)
    finally:
        for p in procs.values():
            p.stop()
        lab.close()


def test_every_node_classifies_its_nat(swarm: Swarm) -> None:
    got = {n: p.request(cmd="node_stats")["nat_type"] for n, p in swarm.procs.items()}
    assert got == NAT_TYPES, got


def _transfer(swarm: Swarm, src: str, dst: str, purpose: str, seed: int) -> dict:
    sender, receiver = swarm.procs[src], swarm.procs[dst]
    receiver.send(cmd="data_recv", peer=sender.peer, purpose=purpose)
    sent = sender.request(cmd="data_send", peer=receiver.peer, purpose=purpose, seed=seed,
                          size=DATA_BYTES, channels=2, timeout=120)
    got = receiver.expect("received", timeout=120)
    assert sent["event"] == "sent", sent
    assert got["bytes"] == DATA_BYTES and got["sha256"] == sent["sha256"]
    return sent


@pytest.mark.parametrize("src,dst,path,route", EXPECTED,
                         ids=[f"{s}-{d}" for s, d, *_ in EXPECTED])
def test_connect_peer_takes_the_expected_path(swarm: Swarm, src: str, dst: str, path: str,
                                              route: str) -> None:
    a, b = swarm.procs[src], swarm.procs[dst]
    reply = a.request(cmd="connect_peer", peer=b.peer, timeout=60)
    assert reply["event"] == "connect_peer", reply
    got = reply["path"]
    back = b.request(cmd="path", peer=a.peer)["path"]
    if path == "relay":
        assert got.startswith("relay:"), reply
        # Any public node connected to both ends may relay (DHT traffic connects them too).
        assert NAT_TYPES[swarm.name_of_short(got.split(":")[1])] == "public", got
    else:
        assert got == path, reply
    assert back == got, (got, back)  # both ends agree on the path
    sent = _transfer(swarm, src, dst, f"t-{src}-{dst}", seed=len(src + dst))
    assert sent["route"] == route, sent
    assert sent["path"] == got


def test_relayed_pair_upgrades_to_punched(swarm: Swarm) -> None:
    """b and a2 (two EIM NATs) start on a relay; a punch then moves them to a
    direct path, and data still flows."""
    b, a2 = swarm.procs["b"], swarm.procs["a2"]
    relay = swarm.procs["p2"].peer
    assert b.request(cmd="relay_to", peer=a2.peer, relay=relay)["path"].startswith("relay:")
    assert a2.request(cmd="path", peer=b.peer)["path"].startswith("relay:")
    assert b.request(cmd="try_upgrade", peer=a2.peer)["path"] == "punched"
    assert a2.request(cmd="path", peer=b.peer)["path"] == "punched"
    _transfer(swarm, "b", "a2", "upgrade", seed=7)


def test_killing_the_relay_moves_relayed_pairs_to_another(swarm: Swarm) -> None:
    pairs = [("a", "c"), ("c", "d")]
    paths = {pair: swarm.procs[pair[0]].request(cmd="connect_peer",
                                                peer=swarm.procs[pair[1]].peer)["path"]
             for pair in pairs}
    relays = {swarm.name_of_short(p.split(":")[1]) for p in paths.values()}
    assert all(p.startswith("relay:") for p in paths.values()), paths
    victim = sorted(relays)[0]
    swarm.procs[victim].signal(9)
    deadline = time.monotonic() + 90
    moved: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline and len(moved) < len(pairs):
        for src, dst in pairs:
            path = swarm.procs[src].request(cmd="path", peer=swarm.procs[dst].peer)["path"]
            back = swarm.procs[dst].request(cmd="path", peer=swarm.procs[src].peer)["path"]
            if path == back and path.startswith("relay:") \
                    and swarm.name_of_short(path[6:]) != victim:
                moved[(src, dst)] = path
        time.sleep(1)
    assert len(moved) == len(pairs), (victim, paths, moved)
    for i, (src, dst) in enumerate(pairs):
        _transfer(swarm, src, dst, f"after-kill-{i}", seed=100 + i)
