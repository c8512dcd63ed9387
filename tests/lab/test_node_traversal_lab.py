"""Real peerd nodes reach each other by peer id across every pair of NAT types.

One lab for the module (``node_swarm``): ``connect_peer`` must find the path
in ``EXPECTED``, both ends must report it, and a data link opened on it must
carry bytes intact by the expected route.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import require_lab
from netns import Lab
from node_swarm import EXPECTED, NAT_TYPES, Swarm, build_swarm

from peerd.identity import PeerId

pytestmark = pytest.mark.lab

DATA_BYTES = 2_000_000


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    require_lab()
    lab = Lab()
    try:
        s = build_swarm(lab)
        try:
            yield s
        finally:
            s.close()
    finally:
        lab.close()


def test_every_node_classifies_its_nat(swarm: Swarm) -> None:
    got = {n: p.request(cmd="node_stats")["nat_type"] for n, p in swarm.procs.items()}
    assert got == NAT_TYPES, got


@pytest.mark.parametrize("src,dst,path,route", EXPECTED,
                         ids=[f"{s}-{d}" for s, d, *_ in EXPECTED])
def test_connect_peer_takes_the_expected_path(swarm: Swarm, src: str, dst: str, path: str,
                                              route: str) -> None:
    a, b = swarm.procs[src], swarm.procs[dst]
    reply = swarm.connect_fresh(src, dst)
    assert reply["event"] == "connect_peer", reply
    got = reply["path"]
    # b admits the session a moment after a's connect returns (another process:
    # no event crosses over), so poll its view briefly.
    deadline = time.monotonic() + 10
    while (back := b.request(cmd="path", peer=a.peer)["path"]) == "none":
        assert time.monotonic() < deadline, "b never saw the session a opened"
        time.sleep(0.05)
    if path == "relay":
        assert got.startswith("relay:"), reply
        # Any public node connected to both ends may relay (DHT traffic connects them too).
        assert NAT_TYPES[swarm.name_of_short(got.split(":")[1])] == "public", got
    else:
        assert got == path, reply
    assert back == got, (got, back)  # both ends agree on the path
    paths = dict(map(tuple, a.request(cmd="node_stats")["peer_paths"]))
    assert paths[PeerId.parse(b.peer).short] == got  # statistics() tells the same
    sent = swarm.transfer(src, dst, f"t-{src}-{dst}", seed=len(src + dst), size=DATA_BYTES)
    assert sent["route"] == route, sent
    assert sent["path"] == got


def test_relayed_pair_upgrades_to_punched(swarm: Swarm) -> None:
    """b and a2 (two EIM NATs) start on a relay; a punch then moves them to a
    direct path, and data still flows."""
    b, a2 = swarm.procs["b"], swarm.procs["a2"]
    relay = swarm.procs["p2"].peer
    # DHT traffic may connect them on a network path at any time, and a relayed
    # session loses to that (network beats relay): drop it and retry, bounded.
    for _ in range(5):
        b.request(cmd="disconnect", peer=a2.peer)
        a2.request(cmd="disconnect", peer=b.peer)
        there = b.request(cmd="relay_to", peer=a2.peer, relay=relay)["path"]
        deadline = time.monotonic() + 10  # a2 admits the circuit a moment later
        while (back := a2.request(cmd="path", peer=b.peer)["path"]) == "none" \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        if there.startswith("relay:") and back == there:
            break
    assert there.startswith("relay:") and back == there, (there, back)
    upgraded = b.request(cmd="try_upgrade", peer=a2.peer)["path"]
    # An earlier a-b punch leaves a hole in b's address-dependent filter that a2
    # (behind a's NAT, same public address) can dial straight through.
    assert upgraded in ("punched", "direct"), upgraded
    assert a2.request(cmd="path", peer=b.peer)["path"] == upgraded
    swarm.transfer("b", "a2", "upgrade", seed=7, size=DATA_BYTES)


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
        swarm.transfer(src, dst, f"after-kill-{i}", seed=100 + i, size=DATA_BYTES)
