"""A joiner that one member cannot reach, on a real network (marked ``lab``).

Three peer processes in network namespaces run a ring; a fourth asks to
join while nftables drops every packet between it and one member, not
the coordinator (on the internet: a NAT neither side gets through, and no
relay yet). That member never hears the request, so the members must not
admit the joiner, though the coordinator hears it: that member could not
heartbeat it or open the data links the ring needs, and every round would
fail. They go on among themselves, each result exact over the three; once
the link works, a round boundary admits the joiner and a round covers all
four, byte-identical on every peer.

Processes are stopped by pid and the namespaces removed whatever happens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from netns import Lab, Node

from peerd.peerproc import LocalSwarm, PeerProcess
from tests.allreduce_mp.checks import check_round

pytestmark = pytest.mark.lab

SIZE = 10_007  # fp32 elements per all-reduce (a prime: uneven chunks)
CUT_ROUNDS = 3  # round boundaries and all-reduces while the link is cut
ADMIT_SECONDS = 30.0  # bound on rounds until the healed joiner is admitted
TIMEOUT = 60.0


def boundary(members: list[PeerProcess], run: str) -> list[str]:
    """One round boundary on every member; the members of the view they agreed."""
    for p in members:
        p.send(cmd="update_view", run=run)
    views = [p.expect("view", timeout=TIMEOUT) for p in members]
    assert len({(v["revision"], tuple(v["view"])) for v in views}) == 1, views
    return list(views[0]["view"])


def exact_over(sw: LocalSwarm, results: list[dict[str, Any]], rnd: int, want: list[str],
               out: Path) -> None:
    """Every peer holds the average over exactly ``want``, the same bytes."""
    check_round(sw, results, 1, rnd, SIZE, out)
    assert sorted(results[0]["participants"]) == sorted(want), results


def test_joiner_one_member_cannot_reach_waits_until_it_can(lab: Lab, tmp_path: Path) -> None:
    hosts: list[Node] = [lab.public_host(f"j{i}") for i in range(4)]

    def factory(key_hex: str, index: int) -> PeerProcess:
        host = hosts[index]
        return PeerProcess(key_hex, index, listen=f"{host.ip}:0",
                           prefix=["ip", "netns", "exec", host.ns])

    with LocalSwarm(3, factory=factory) as sw:
        members = list(sw.peers)
        ids = [p.peer for p in members]
        # The member with the highest id: never the coordinator (the lowest),
        # which hears the joiner and, alone, would admit it.
        deaf = max(members, key=lambda p: p.peer)
        lab.block(hosts[deaf.index], [hosts[3]])
        joiner = factory(sw.key_hex, 3)
        sw.peers.append(joiner)  # stopped with the swarm
        for p in members:
            if p is not deaf:
                joiner.request(cmd="connect", addr=p.addr)
        joiner.send(cmd="join", run=sw.run, timeout=300)

        for rnd in range(CUT_ROUNDS):
            assert joiner.peer not in boundary(members, sw.run), f"admitted at boundary {rnd}"
            res = sw.all_reduce(members, size=SIZE, seed=1, round=rnd, out=str(tmp_path))
            exact_over(sw, res, rnd, ids, tmp_path)

        lab.unblock(hosts[deaf.index])
        deaf.request(cmd="connect", addr=joiner.addr)  # the joiner is busy joining
        # Training goes on, a boundary before each round, until the joiner's next
        # request (every heartbeat interval) shows the link works.
        rnd = CUT_ROUNDS
        deadline = time.monotonic() + ADMIT_SECONDS
        while joiner.peer not in boundary(members, sw.run):
            assert time.monotonic() < deadline, f"not admitted within {ADMIT_SECONDS} s"
            res = sw.all_reduce(members, size=SIZE, seed=1, round=rnd, out=str(tmp_path))
            exact_over(sw, res, rnd, ids, tmp_path)
            rnd += 1
        joiner.expect("joined", timeout=TIMEOUT)
        res = sw.all_reduce(sw.peers, size=SIZE, seed=1, round=rnd, out=str(tmp_path))
        exact_over(sw, res, rnd, [*ids, joiner.peer], tmp_path)
