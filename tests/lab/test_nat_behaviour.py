"""The lab's NATs behave as RFC 4787 says they should (plain sockets)."""

from __future__ import annotations

import lab_agents as agents
import pytest
from lab_topology import OBSERVER_PORT, Topology

from nat.classify import Classification, Mapping, classify
from nat.endpoint import Endpoint, NatType
from nat.observed import Observation

pytestmark = pytest.mark.lab


def classified(
    topo: Topology, node_name: str, port: int, proto: str = "udp"
) -> tuple[list, Classification]:
    node = getattr(topo, node_name)
    rows = topo.lab.run_py(node, agents.observe, port, topo.observers, proto)
    obs = [Observation(Endpoint(r[0], r[1]), Endpoint(r[2], r[3]), float(i))
           for i, r in enumerate(rows)]
    return rows, classify([Endpoint(node.ip, port)], obs)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_eim_shows_one_public_port_to_two_observers(topo: Topology, proto: str) -> None:
    rows, c = classified(topo, "a", 40101, proto)
    assert [r[2] for r in rows] == [topo.e1.wan_ip] * 2
    assert rows[0][3] == rows[1][3]
    assert c.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert c.nat_type is NatType.EASY
    assert c.public_ip == topo.e1.wan_ip


def test_symmetric_shows_a_port_per_destination(topo: Topology) -> None:
    rows, c = classified(topo, "c", 40102)
    assert [r[2] for r in rows] == [topo.s1.wan_ip] * 2
    assert rows[0][3] != rows[1][3]
    assert c.nat_type is NatType.HARD


def test_public_host_is_seen_untranslated(topo: Topology) -> None:
    rows, c = classified(topo, "rly", 40103)
    assert {(r[2], r[3]) for r in rows} == {(topo.rly.ip, 40103)}
    assert c.mapping is Mapping.NONE and c.nat_type is NatType.PUBLIC


def test_apdf_drops_unsolicited_packets(topo: Topology) -> None:
    """After a contacts o1, only o1's own endpoint gets through: o1 from
    another port and o2 (another IP) are both filtered."""
    port = 40104
    probe = topo.lab.spawn_py(topo.a, agents.filter_probe, port, topo.observers[0], 1.5)
    probe.wait_ready()
    public = [topo.e1.wan_ip, port]
    topo.lab.run_py(topo.o2, agents.send_udp, 5555, public, 5)
    topo.lab.run_py(topo.o1, agents.send_udp, 5556, public, 5)
    sources = probe.result(10)
    # The observer's echo proves the path for the contacted endpoint works.
    assert sources == [[topo.o1.ip, OBSERVER_PORT]]


def _delivered(topo: Topology, port: int, count: int) -> int:
    counter = topo.lab.spawn_py(topo.o2, agents.count_udp, port, 20.0)
    counter.wait_ready()
    topo.lab.run_py(topo.o1, agents.send_udp, port + 1, [topo.o2.ip, port], count)
    topo.lab.run_py(topo.o2, agents.stop_udp, port)  # loopback is exempt from the loss rule
    return int(counter.result(10))


def test_loss_rule_drops_the_configured_share(topo: Topology) -> None:
    assert _delivered(topo, 40105, 20) == 20  # no loss configured: all arrive
    try:
        topo.lab.drop_percent(topo.o2.ns, 100)
        assert _delivered(topo, 40107, 20) == 0
        topo.lab.drop_percent(topo.o2.ns, 50)
        # Binomial(100, 0.5): outside 20..80 has probability ~1e-9.
        assert 20 <= _delivered(topo, 40109, 100) <= 80
    finally:
        topo.lab.clear_loss(topo.o2.ns)
    tables = topo.lab._sh(topo.o2.ns, "nft", "list", "tables")
    assert "labloss" not in tables
