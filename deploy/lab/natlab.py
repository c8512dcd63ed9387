#!/usr/bin/env python3
"""Bring the standard NAT lab up by hand (root), for experiments and demos.

    sudo python deploy/lab/natlab.py up [--hold SECONDS]   # build, print, hold, tear down
    sudo python deploy/lab/natlab.py sweep                 # remove namespaces of dead runs

``up`` prints one JSON object naming every namespace and address, then waits
(Ctrl-C or SIGTERM ends it) and removes everything it built. Run programs in
the lab with ``ip netns exec <namespace> <command>``. The implementation lives
in tests/lab/netns.py (the same code the lab tests use).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

LAB_DIR = Path(__file__).resolve().parents[2] / "tests" / "lab"
sys.path.insert(0, str(LAB_DIR))

from lab_topology import Topology  # noqa: E402
from netns import Lab, Node, Router, missing_tools, sweep_stale  # noqa: E402


def describe(topo: Topology) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(topo).items():
        if isinstance(value, Node):
            out[name] = {"namespace": value.ns, "ip": value.ip, "public_ip": value.public_ip}
        elif isinstance(value, Router):
            out[name] = {"namespace": value.ns, "kind": value.kind.value,
                         "wan_ip": value.wan_ip, "lan": f"{value.lan_net}.0/24"}
    return out


def up(hold: float | None) -> None:
    lab = Lab()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print(json.dumps(describe(Topology(lab)), indent=2), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait(hold)
    finally:
        lab.close()
        print("lab removed", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build the standard topology and hold it")
    p_up.add_argument("--hold", type=float, default=None, help="seconds (default: until signal)")
    sub.add_parser("sweep", help="remove lab namespaces whose run is gone")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("natlab needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    if missing_tools():
        print(f"missing tools: {missing_tools()}: apt-get install -y nftables iproute2",
              file=sys.stderr)
        return 2
    if args.cmd == "sweep":
        for name in sweep_stale():
            print(f"removed {name}")
        return 0
    up(args.hold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
