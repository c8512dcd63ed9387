"""Real peerd nodes in the NAT lab: authenticated sessions across NATs and the
node's own NAT classification from its peers' observations."""

from __future__ import annotations

import os

import pytest
from netns import Lab, NatKind

from peerd.peerproc import PeerProcess

pytestmark = pytest.mark.lab


def node_in(lab: Lab, host, key_hex: str, index: int) -> PeerProcess:  # type: ignore[no-untyped-def]
    return PeerProcess(key_hex, index, listen=f"{host.ip}:0",
                       prefix=["ip", "netns", "exec", host.ns])


@pytest.mark.parametrize("kind,expected", [(None, "public"), (NatKind.EIM, "easy"),
                                           (NatKind.SYMMETRIC, "hard")])
def test_node_classifies_its_nat_from_two_public_peers(lab: Lab, kind: NatKind | None,
                                                       expected: str) -> None:
    key = os.urandom(32).hex()
    obs = [lab.public_host(f"obs{i}") for i in range(2)]
    host = lab.public_host("me") if kind is None else lab.host_behind(lab.nat("rtr", kind), "me")
    peers: list[PeerProcess] = []
    try:
        peers = [node_in(lab, h, key, i) for i, h in enumerate(obs)]
        me = node_in(lab, host, key, 2)
        peers.append(me)
        for o in peers[:2]:
            assert me.request(cmd="connect", addr=o.addr)["event"] == "connected"
        stats = me.request(cmd="node_stats")
        assert stats["peers"] == 2
        assert stats["nat_type"] == expected, stats
        if kind is not None:
            # The observers saw the router's public address, not the private one.
            assert all(not a.startswith("10.") for a in stats["observed_addresses"])
    finally:
        for p in peers:
            p.stop()


def test_session_and_data_between_two_easy_nats_via_public_peer(lab: Lab) -> None:
    """A node behind a NAT reaches a public node; the public node answers the
    observed (router) address, so both directions of RPC and data work."""
    key = os.urandom(32).hex()
    pub = lab.public_host("pub")
    inside = lab.host_behind(lab.nat("rtr", NatKind.EIM), "in")
    a = node_in(lab, pub, key, 0)
    b = node_in(lab, inside, key, 1)
    try:
        assert b.request(cmd="connect", addr=a.addr)["peer"] == a.peer
        for p in (a, b):
            p.send(cmd="join", run="r", members=[a.peer, b.peer])
        assert [p.expect("joined")["event"] for p in (a, b)] == ["joined", "joined"]
        for p in (a, b):
            p.send(cmd="allreduce", run="r", size=100_000, seed=1, round=0)
        res = [p.expect("result", "error", timeout=60) for p in (a, b)]
        assert all(r["event"] == "result" for r in res), res
        assert res[0]["sha256"] == res[1]["sha256"]
    finally:
        a.stop()
        b.stop()
