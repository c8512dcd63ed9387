"""Fixtures for the network-namespace NAT lab.

Lab tests are marked ``lab``. They skip only when not running as root (the
reason is printed); as root, missing ``ip``/``nft``/``tc`` is a hard failure,
so a CI runner that should run them can never skip them silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lab_agents
from lab_topology import Topology
from netns import Lab, missing_tools, sweep_stale


def require_lab() -> None:
    if os.geteuid() != 0:
        reason = "NAT lab tests need root (network namespaces, nftables); run the suite as root"
        print(f"\nSKIP lab: {reason}", file=sys.stderr)
        pytest.skip(reason)
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"running as root but {', '.join(missing)} not installed: "
            "apt-get install -y nftables iproute2",
            pytrace=False,
        )


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An empty lab, torn down after the test whatever happens."""
    require_lab()
    sweep_stale()
    instance = Lab()
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="session")
def topo() -> Iterator[Topology]:
    """The standard topology with observers and a relay running; shared by all
    lab tests (each test uses its own ports), removed at session end."""
    require_lab()
    sweep_stale()
    instance = Lab()
    try:
        t = Topology(instance)
        services = [
            instance.spawn_py(t.o1, lab_agents.observer, t.observer_port, 300.0),
            instance.spawn_py(t.o2, lab_agents.observer, t.observer_port, 300.0),
            instance.spawn_py(t.rly, lab_agents.relay_server, t.relay[1], 300.0, 1_000_000.0),
        ]
        for service in services:
            service.wait_ready()
        yield t
    finally:
        instance.close()
