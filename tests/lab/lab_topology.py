"""The standard lab topology shared by the lab tests."""

from __future__ import annotations

from netns import Lab, NatKind

OBSERVER_PORT = 3478
RELAY_PORT = 4001


class Topology:
    """The standard lab: two observers and a relay on the internet; EIM routers
    e1 (hosts a, a2) and e2 (host b); symmetric routers s1 (c) and s2 (d)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.observer_port = OBSERVER_PORT
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
