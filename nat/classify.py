"""Classify this node's NAT from observations and dial-back results (pure).

Mapping (RFC 4787) comes from what public observers saw of one local socket:
the same public endpoint for every observer is endpoint-independent mapping
(EIM); a port that changes only with the observer's IP is address-dependent;
a port that changes with the observer's port too is address-and-port-dependent
("symmetric"). Nothing is concluded from fewer than two distinct observer IPs.

Filtering comes from AutoNAT-style dial-backs: a peer we never sent to tries
to reach our public endpoint. We see the arrival ourselves, so a success is a
fact, not a peer's claim. Success from a never-contacted IP means
endpoint-independent filtering; success only from a contacted IP (other port)
means address-dependent; otherwise we assume the strict (APDF) case, which
hole punching handles the same way as address-dependent filtering.

Port deltas between successive new mappings are kept: a sequential allocator
makes the next port predictable (``Classification.predict_ports``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from nat.endpoint import Endpoint, NatType
from nat.observed import Observation

MAX_PREDICTABLE_STEP = 64  # larger strides are indistinguishable from random


class Mapping(enum.Enum):
    UNKNOWN = "unknown"
    NONE = "none"  # no translation: observers see our local endpoint
    ENDPOINT_INDEPENDENT = "eim"
    ADDRESS_DEPENDENT = "adm"
    ADDRESS_AND_PORT_DEPENDENT = "apdm"


class Filtering(enum.Enum):
    UNKNOWN = "unknown"
    ENDPOINT_INDEPENDENT = "eif"
    ADDRESS_DEPENDENT = "adf"
    ADDRESS_AND_PORT_DEPENDENT = "apdf"


@dataclass(frozen=True)
class DialBack:
    """A dial-back to our public endpoint ``target`` from ``dialer``; ``reached``
    is whether we saw it arrive."""

    dialer: Endpoint
    target: Endpoint
    reached: bool


@dataclass(frozen=True)
class Classification:
    mapping: Mapping
    filtering: Filtering
    nat_type: NatType
    public_ip: str | None
    port_deltas: tuple[int, ...]
    port_step: int | None  # constant delta of a sequential allocator, if any
    last_port: int | None  # newest public port seen

    def predict_ports(self, count: int) -> tuple[int, ...]:
        """The next ``count`` public ports a sequential allocator will hand out."""
        if self.port_step is None or self.last_port is None or count <= 0:
            return ()
        out = []
        for i in range(1, count + 1):
            port = self.last_port + i * self.port_step
            if 1 <= port <= 65535:
                out.append(port)
        return tuple(out)


def classify(
    local: Iterable[Endpoint],
    observations: Sequence[Observation],
    dial_backs: Sequence[DialBack] = (),
) -> Classification:
    """Classify from the local socket's own addresses, peers' observations of it
    and dial-back outcomes. Observers on LAN addresses are ignored (they see us
    without crossing the NAT)."""
    local_set = set(local)
    public = sorted((o for o in observations if not o.observer.is_lan), key=lambda o: o.at)
    mapping = _mapping(local_set, public)
    deltas, step, last = _deltas(public) if mapping in _DEPENDENT else ((), None, None)
    contacted = {o.observer for o in public}
    filtering = _filtering(contacted, dial_backs)
    ips = {o.observed.ip for o in public}
    public_ip = next(iter(ips)) if len(ips) == 1 and mapping is not Mapping.UNKNOWN else None
    return Classification(
        mapping=mapping,
        filtering=filtering,
        nat_type=nat_type_of(mapping, filtering),
        public_ip=public_ip,
        port_deltas=deltas,
        port_step=step,
        last_port=last,
    )


_DEPENDENT = (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT)


def nat_type_of(mapping: Mapping, filtering: Filtering) -> NatType:
    """Collapse RFC 4787 behaviours into the coarse class the strategy uses."""
    if mapping is Mapping.UNKNOWN:
        return NatType.UNKNOWN
    if mapping in _DEPENDENT:
        return NatType.HARD
    if filtering is Filtering.ENDPOINT_INDEPENDENT:
        return NatType.PUBLIC
    if mapping is Mapping.NONE and filtering is Filtering.UNKNOWN:
        # Observers see our own socket address: assume open until a dial-back fails.
        return NatType.PUBLIC
    return NatType.EASY  # EIM (or a firewalled public host): punchable


def _mapping(local: set[Endpoint], public: Sequence[Observation]) -> Mapping:
    if len({o.observer.ip for o in public}) < 2:
        return Mapping.UNKNOWN
    seen = {o.observed for o in public}
    if seen <= local:
        return Mapping.NONE
    if len(seen) == 1:
        return Mapping.ENDPOINT_INDEPENDENT
    if len({o.observed.ip for o in public}) > 1:
        # Several public IPs for one socket (a pooled CGNAT): unpredictable.
        return Mapping.ADDRESS_AND_PORT_DEPENDENT
    by_ip: dict[str, set[int]] = {}
    for o in public:
        by_ip.setdefault(o.observer.ip, set()).add(o.observed.port)
    if any(len(ports) > 1 for ports in by_ip.values()):
        return Mapping.ADDRESS_AND_PORT_DEPENDENT
    # One port per observer IP, but different across IPs. Without two ports
    # at one IP this could still be APDM; the address-dependent label is the
    # weaker claim and both are "hard" for the strategy.
    return Mapping.ADDRESS_DEPENDENT


def _deltas(public: Sequence[Observation]) -> tuple[tuple[int, ...], int | None, int | None]:
    ports: list[int] = []
    for o in public:  # oldest first; repeated reports of one mapping add nothing
        if not ports or ports[-1] != o.observed.port:
            ports.append(o.observed.port)
    deltas = tuple(b - a for a, b in pairwise(ports))
    step = None
    if len(deltas) >= 2 and len(set(deltas)) == 1 and 0 < abs(deltas[0]) <= MAX_PREDICTABLE_STEP:
        step = deltas[0]
    return deltas, step, (ports[-1] if ports else None)


def _filtering(contacted: set[Endpoint], dial_backs: Sequence[DialBack]) -> Filtering:
    contacted_ips = {ep.ip for ep in contacted}
    informative = [d for d in dial_backs if d.dialer not in contacted]
    if not informative:
        return Filtering.UNKNOWN
    if any(d.reached and d.dialer.ip not in contacted_ips for d in informative):
        return Filtering.ENDPOINT_INDEPENDENT
    if any(d.reached for d in informative):
        return Filtering.ADDRESS_DEPENDENT
    return Filtering.ADDRESS_AND_PORT_DEPENDENT
