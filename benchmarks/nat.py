#!/usr/bin/env python3
"""NAT traversal in the netns lab (root): punch success and time-to-direct per
NAT pair, and direct vs relayed TCP throughput.

What it measures, all on this machine's kernel with nftables NATs (no delay
emulation: netem is missing here, so times are CPU/scheduling-bound, not RTT):

* for E-E, E-S and S-S pairs, ``RUNS`` coordinated UDP punches driven by
  nat.punch: success rate and the initiator's time from first signalling
  message to a proven direct path (median);
* bytes/s of one TCP stream between two public hosts, directly and through
  the nat.relay_tcp relay (rate limits set far above what it can carry).

Last line: the throughput ratio direct / relayed (how much a relay costs).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and "nat" would name this
# file instead of the nat package: drop the folder, add the lab's helpers.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests" / "lab"))

import lab_agents as agents  # noqa: E402
from lab_topology import Topology  # noqa: E402
from netns import Lab, missing_tools  # noqa: E402

RUNS = 5
TRANSFER = 200_000_000
FAST_RELAY_PORT = 4002


def punch_pair(topo: Topology, initiator: str, responder: str, port: int) -> dict:
    session = os.urandom(16).hex()
    procs = [
        topo.lab.spawn_py(getattr(topo, name), agents.punch_agent, "udp", role, topo.relay,
                          session, port, topo.observers, getattr(topo, name).ip, 3)
        for role, name in (("responder", responder), ("initiator", initiator))
    ]
    _, init = (p.result(60) for p in procs)
    return init


def throughput(topo: Topology) -> tuple[float, float]:
    lab = topo.lab
    sink = lab.spawn_py(topo.o2, agents.tcp_sink, 45000, 120.0)
    sink.wait_ready()
    direct_s = lab.run_py(topo.o1, agents.tcp_source, [topo.o2.ip, 45000], TRANSFER, timeout=120)
    assert sink.result(30) == TRANSFER
    relay = lab.spawn_py(topo.rly, agents.relay_server, FAST_RELAY_PORT, 120.0, 1e11)
    relay.wait_ready()
    session = os.urandom(16).hex()
    where = [topo.rly.ip, FAST_RELAY_PORT]
    recv = lab.spawn_py(topo.o2, agents.relay_transfer, where, session, "o2", 0, TRANSFER)
    send = lab.spawn_py(topo.o1, agents.relay_transfer, where, session, "o1", TRANSFER, 0)
    send.result(120)
    got = recv.result(120)
    assert got["received"] == TRANSFER, got
    return TRANSFER / direct_s, TRANSFER / got["seconds"]


def main() -> int:
    if os.geteuid() != 0 or missing_tools():
        print("benchmarks/nat.py needs root with nftables and iproute2", file=sys.stderr)
        return 2
    lab = Lab()
    try:
        topo = Topology(lab)
        services = [lab.spawn_py(topo.o1, agents.observer, topo.observer_port, 600.0),
                    lab.spawn_py(topo.o2, agents.observer, topo.observer_port, 600.0),
                    lab.spawn_py(topo.rly, agents.relay_server, topo.relay[1], 600.0, 1e6)]
        for s in services:
            s.wait_ready()
        port = 46000
        for label, init, resp in (("E-E", "a", "b"), ("E-S", "a", "c"), ("S-S", "c", "d")):
            outcomes = []
            for _ in range(RUNS):
                port += 10
                outcomes.append(punch_pair(topo, init, resp, port))
            ok = [o for o in outcomes if o["succeeded"]]
            times = [o["punch_seconds"] for o in ok]
            median = f"{statistics.median(times) * 1000:.0f} ms" if times else "n/a"
            first = sum(o["attempt"] == 1 for o in ok)
            print(f"UDP punch {label}: {len(ok)}/{RUNS} succeeded "
                  f"({first} on the first attempt), median time to direct path {median}")
        direct, relayed = throughput(topo)
        print(f"TCP direct (veth, no shaping): {direct * 8 / 1e9:.2f} Gbit/s")
        print(f"TCP through nat.relay_tcp relay: {relayed * 8 / 1e9:.2f} Gbit/s")
        print(f"ratio direct/relayed throughput: {direct / relayed:.1f}x")
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
