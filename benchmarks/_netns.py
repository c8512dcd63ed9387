"""Peer processes in network namespaces with shaped uplinks (the NAT lab's
``tests/lab/netns.py``; root): a ``LocalSwarm`` factory and its lab."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from peerd.peerproc import PeerProcess

ROOT = Path(__file__).resolve().parents[1]


def netns_factory(rate: str) -> tuple[Any, Any]:
    """``(lab, factory)``: each peer in its own namespace, its egress limited
    to ``rate`` by tc tbf. Close the lab when done (namespaces, processes)."""
    sys.path.insert(0, str(ROOT / "tests" / "lab"))
    from netns import Lab  # type: ignore[import-not-found]

    lab = Lab()

    def factory(key_hex: str, index: int) -> PeerProcess:
        host = lab.public_host(f"p{index}")
        lab.limit_rate(host, rate)
        return PeerProcess(key_hex, index, listen=f"{host.ip}:0",
                           prefix=["ip", "netns", "exec", host.ns])

    return lab, factory
