"""Fixtures for the network-namespace NAT lab.

Lab tests are marked ``lab``. They skip only when not running as root (the
reason is printed); as root, missing ``ip``/``nft``/``tc`` is a hard failure,
so a CI runner that should run them can never skip them silently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lab_agents
from lab_topology import Topology
from netns import Lab, require_lab, sweep_stale

__all__ = ["require_lab"]  # lab test modules import it from here


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
