"""Coordinated hole punching through real NATs, driven by nat.punch.

Each side observes its own address (two observers), classifies its NAT,
joins a relay circuit for signalling, and runs the HolePunch core with a real
UDP or TCP dialer. The outcome must match what nat.strategy predicts.
"""

from __future__ import annotations

import itertools
import os

import lab_agents as agents
import pytest
from lab_topology import Topology

from nat.endpoint import Endpoint, NatType
from nat.strategy import PathKind, PeerInfo, plan_paths

pytestmark = pytest.mark.lab

_ports = itertools.count(41000, 10)


def punch(topo: Topology, proto: str, initiator: str, responder: str,
          attempts: int = 3) -> tuple[dict, dict]:
    session = os.urandom(16).hex()
    port = next(_ports)
    sides = []
    for role, name in (("responder", responder), ("initiator", initiator)):
        node = getattr(topo, name)
        sides.append(topo.lab.spawn_py(node, agents.punch_agent, proto, role, topo.relay,
                                       session, port, topo.observers, node.ip, attempts))
    resp, init = (p.result(60) for p in sides)
    return init, resp


def plan_for(init: dict, resp: dict, init_ip: str, resp_ip: str) -> list[PathKind]:
    def info(side: dict, lan_ip: str) -> PeerInfo:
        cands = [c.rsplit(":", 1) for c in side["candidates"]]
        endpoints = [Endpoint(ip, int(p)) for ip, p in cands]
        return PeerInfo(NatType[side["nat_type"]], side["public_ip"],
                        tuple(e for e in endpoints if e.ip == lan_ip),
                        tuple(e for e in endpoints if e.ip != lan_ip))
    return [a.kind for a in plan_paths(info(init, init_ip), info(resp, resp_ip))]


@pytest.mark.parametrize(
    ("initiator", "responder", "types", "expect"),
    [
        ("a", "b", ("EASY", "EASY"), True),
        ("a", "c", ("EASY", "HARD"), False),
        ("d", "b", ("HARD", "EASY"), False),
        ("c", "d", ("HARD", "HARD"), False),
    ],
    ids=["E-E", "E-S", "S-E", "S-S"],
)
def test_udp_punch_matches_the_strategy_table(
    topo: Topology, initiator: str, responder: str, types: tuple[str, str], expect: bool
) -> None:
    init, resp = punch(topo, "udp", initiator, responder)
    assert (init["nat_type"], resp["nat_type"]) == types
    plan = plan_for(init, resp, getattr(topo, initiator).ip, getattr(topo, responder).ip)
    assert (PathKind.PUNCH in plan) is expect
    assert plan[-1] is PathKind.RELAY
    assert init["succeeded"] is expect and resp["succeeded"] is expect, (init, resp)
    if expect:
        assert init["attempt"] == 1  # RTT-synchronised dialing works first time here
        # The path found is the responder's confirmed public endpoint.
        assert init["remote"] == resp["candidates"][1]
        assert init["remote"].startswith(getattr(topo, responder).public_ip + ":")
        assert init["data_ok"] and resp["data_ok"]
    else:
        assert len(init["failures"]) == 3  # every attempt was made before giving up


def test_same_nat_hosts_punch_over_private_addresses(topo: Topology) -> None:
    init, resp = punch(topo, "udp", "a", "a2")
    assert init["public_ip"] == resp["public_ip"] == topo.e1.wan_ip
    plan = plan_for(init, resp, topo.a.ip, topo.a2.ip)
    assert plan[0] is PathKind.DIRECT_PRIVATE
    assert init["succeeded"] and resp["succeeded"], (init, resp)
    # No hairpinning on a Linux NAT: the working path is the private one.
    assert init["remote"].startswith(topo.a2.ip + ":")
    assert init["data_ok"] and resp["data_ok"]


def test_tcp_simultaneous_open_between_two_eim_hosts(topo: Topology) -> None:
    init, resp = punch(topo, "tcp", "a", "b", attempts=2)
    assert init["succeeded"] and resp["succeeded"], (init, resp)
    assert init["remote"].startswith(topo.e2.wan_ip + ":")
    assert resp["remote"].startswith(topo.e1.wan_ip + ":")
    assert init["data_ok"] and resp["data_ok"]


def test_relay_carries_a_symmetric_pair_at_the_circuit_rate(topo: Topology) -> None:
    """S-S cannot punch; the relay circuit carries the data, paced at 1 MB/s."""
    session = os.urandom(16).hex()
    nbytes = 1_500_000
    sides = [topo.lab.spawn_py(node, agents.relay_transfer, topo.relay, session, name, nbytes,
                               nbytes)
             for node, name in ((topo.c, "c"), (topo.d, "d"))]
    results = [p.result(60) for p in sides]
    for r in results:
        assert r["received"] == nbytes
        # 1.5 MB each way at 1 MB/s per circuit, after a 64 KiB burst.
        assert r["seconds"] >= (nbytes - 64 * 1024) / 1_000_000 * 0.9
