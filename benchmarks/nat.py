#!/usr/bin/env python3
"""NAT traversal with real peerd nodes in the netns lab (root).

For every NAT-type pair of ``tests/lab/node_swarm`` (public P, EIM "E",
symmetric "S", two same-NAT pairs) it prints the path ``connect_peer`` chose,
the time to a working authenticated session, the data route and the
throughput of a data link (2 channels) opened on that path. Everything runs
on this machine's kernel with nftables NATs and no delay emulation, so times
are CPU/scheduling-bound, not RTT-bound; relayed and QUIC-stream data go
through pure-Python QUIC twice and through the relay's rate limits.

Last line: the fraction of pairs connected without a relay, next to the
fraction for which ``nat.strategy.plan_paths`` has any non-relay path at all
(E-S only by birthday probing, which the node does not run).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and "nat" would name this
# file instead of the nat package: drop the folder, add the lab's helpers.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests" / "lab"))

from netns import Lab, missing_tools  # noqa: E402
from node_swarm import EXPECTED, NAT_TYPES, PAIR_KIND, build_swarm  # noqa: E402

from nat.endpoint import Endpoint, NatType  # noqa: E402
from nat.strategy import PathKind, PeerInfo, plan_paths  # noqa: E402

DIRECT_BYTES = 64_000_000
RELAY_BYTES = 4_000_000
_TYPE = {"public": NatType.PUBLIC, "easy": NatType.EASY, "hard": NatType.HARD}


def possible_in_principle(src: str, dst: str, same_nat: bool) -> bool:
    """Whether the strategy has any non-relay attempt for this pair."""
    ip = "198.51.100.1"

    def info(name: str, public_ip: str) -> PeerInfo:
        return PeerInfo(_TYPE[NAT_TYPES[name]], public_ip, public=(Endpoint(public_ip, 4747),))

    local = info(src, ip)
    remote = info(dst, ip if same_nat else "198.51.100.2")
    if same_nat:
        return True  # LAN addresses
    plan = plan_paths(local, remote, relay_available=False, allow_birthday=True)
    return any(a.kind is not PathKind.RELAY for a in plan)


def main() -> int:
    if os.geteuid() != 0 or missing_tools():
        print("needs root and ip/nft/tc (network namespaces)", file=sys.stderr)
        return 2
    lab = Lab()
    try:
        t0 = time.perf_counter()
        swarm = build_swarm(lab)
        print(f"lab: {len(swarm.procs)} nodes up and classified in "
              f"{time.perf_counter() - t0:.1f} s (no delay emulation; one kernel, 2 shared CPUs)")
        try:
            print(f"{'pair':<14} {'nodes':<7} {'path':<20} {'connect s':>9} {'route':<8} "
                  f"{'link open s':>11} {'MB':>5} {'MB/s':>8}")
            direct = possible = 0
            for i, (src, dst, _, _) in enumerate(EXPECTED):
                reply = swarm.connect_fresh(src, dst)
                path = reply["path"]
                relayed = path.startswith("relay:")
                size = RELAY_BYTES if relayed else DIRECT_BYTES
                sent = swarm.transfer(src, dst, f"bench{i}", seed=i, size=size)
                rate = size / max(sent["wall"] - sent["open_seconds"], 1e-9) / 1e6
                kind = PAIR_KIND[(src, dst)]
                direct += not relayed
                possible += possible_in_principle(src, dst, "same" in kind)
                print(f"{kind:<14} {src + '-' + dst:<7} {path:<20} {reply['seconds']:>9.3f} "
                      f"{sent['route']:<8} {sent['open_seconds']:>11.3f} {size / 1e6:>5.0f} "
                      f"{rate:>8.1f}")
        finally:
            swarm.close()
    finally:
        lab.close()
    n = len(EXPECTED)
    print(f"pairs connected without a relay: {direct}/{n} = {direct / n:.2f}  "
          f"(possible in principle: {possible}/{n} = {possible / n:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
