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

from netns import Lab, missing_tools, sweep_stale  # noqa: E402


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


OBSERVER_PORT = 3478
RELAY_PORT = 4001


class Topology:
    """The standard lab: two observers and a relay on the internet; EIM routers
    e1 (hosts a, a2) and e2 (host b); symmetric routers s1 (c) and s2 (d)."""

    def __init__(self, lab: Lab) -> None:
        from netns import NatKind

        self.lab = lab
        self.o1 = lab.public_host("o1")
        self.o2 = lab.public_host("o2")
        self.rly = lab.public_host("rly")
        self.e1 = lab.nat("e1", NatKind.EIM)
        self.e2 = lab.nat("e2", NatKind.EIM)
        self.s1 = lab.nat("s1", NatKind.SYMMETRIC)
        self.s2 = lab.nat("s2", NatKind.SYMMETRIC)
        self.a = lab.host_behind(self.e1, "a")
        self.a2 = lab.host_behind(self.e1, "a2")
        self.b = lab.host_behind(self.e2, "b")
        self.c = lab.host_behind(self.s1, "c")
        self.d = lab.host_behind(self.s2, "d")
        self.observers = [[self.o1.ip, OBSERVER_PORT], [self.o2.ip, OBSERVER_PORT]]
        self.relay = [self.rly.ip, RELAY_PORT]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    """The standard topology with observers and a relay running; shared by a
    module's tests (each test uses its own ports), removed at module end."""
    require_lab()
    sweep_stale()
    instance = Lab()
    try:
        import agents

        t = Topology(instance)
        services = [
            instance.spawn_py(t.o1, agents.observer, OBSERVER_PORT, 300.0),
            instance.spawn_py(t.o2, agents.observer, OBSERVER_PORT, 300.0),
            instance.spawn_py(t.rly, agents.relay_server, RELAY_PORT, 300.0, 1_000_000.0),
        ]
        for service in services:
            service.wait_ready()
        yield t
    finally:
        instance.close()
