"""What a node knows about its own reachability, from its peers' eyes.

Every dialled peer tells us in the handshake which address our packets came
from; ``ObservedAddresses`` confirms an address only when independent
observers agree, and ``classify`` turns the observations into a NAT type
(public, endpoint-independent, symmetric) that ``peerd status`` shows.
``NatState.info`` condenses all of it into ``NatInfo``: the record a node
publishes in the DHT next to its node record and hands to peers that want to
reach it, and what ``nat.strategy.plan_paths`` plans from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nat.classify import Classification, classify
from nat.endpoint import Endpoint, NatType
from nat.observed import ObservedAddresses
from nat.strategy import PeerInfo
from peerd.wire import message

NAT_INFO_VERSION = 1
MAX_INFO_ENDPOINTS = 8


def _endpoint(addr: tuple[str, int]) -> Endpoint | None:
    try:
        return Endpoint(addr[0], addr[1])
    except ValueError:
        return None  # e.g. port 0 before binding, or a non-IP host


@message(720)
@dataclass(frozen=True)
class NatInfo:
    """How to reach one node: its NAT class, confirmed public endpoints of its
    UDP socket, its LAN endpoints (for peers behind the same NAT), the stride
    of a sequential port allocator (0: none) and whether its NAT keeps local
    port numbers (then a TCP simultaneous open can target the peer's local
    port on its public IP)."""

    version: int
    nat_type: NatType
    public_ip: str | None
    public: tuple[Endpoint, ...]
    private: tuple[Endpoint, ...]
    port_step: int
    port_preserving: bool

    def __post_init__(self) -> None:
        if self.version != NAT_INFO_VERSION:
            raise ValueError(f"NAT info version {self.version} unsupported")
        if len(self.public) > MAX_INFO_ENDPOINTS or len(self.private) > MAX_INFO_ENDPOINTS:
            raise ValueError("too many endpoints")
        if self.public_ip is not None:
            Endpoint(self.public_ip, 1)  # validates the address
        if abs(self.port_step) > 1024:
            raise ValueError("port step out of range")

    def peer_info(self) -> PeerInfo:
        return PeerInfo(self.nat_type, self.public_ip, self.private, self.public, self.port_step)


UNKNOWN_INFO = NatInfo(NAT_INFO_VERSION, NatType.UNKNOWN, None, (), (), 0, False)


class NatState:
    """Observed addresses of this node's one UDP socket, and its NAT class."""

    def __init__(self, local: Sequence[tuple[str, int]]) -> None:
        self._local = [e for a in local if (e := _endpoint(a)) is not None]
        self.observed = ObservedAddresses()

    def record(self, observer: tuple[str, int], observed: tuple[str, int], now: float) -> None:
        o, seen = _endpoint(observer), _endpoint(observed)
        if o is not None and seen is not None:
            self.observed.record(o, seen, now)

    def classification(self, now: float) -> Classification:
        return classify(self._local, self.observed.observations(now))

    def nat_type(self, now: float) -> str:
        return self.classification(now).nat_type.name.lower()

    def confirmed(self, now: float) -> tuple[str, ...]:
        return tuple(f"{e.ip}:{e.port}" for e in self.observed.confirmed(now))

    def info(self, now: float) -> NatInfo:
        """This node's reachability as peers should plan for it."""
        c = self.classification(now)
        public = list(self.observed.confirmed(now))
        if c.nat_type is NatType.PUBLIC and not public:
            public = [e for e in self._local if not e.is_lan]
        private = [e for e in self._local if e.is_lan]
        primary = self.observed.primary(now)
        if primary is None and public:
            primary = public[0]
        preserving = primary is not None and any(e.port == primary.port for e in self._local)
        public_ip = c.public_ip or (public[0].ip if public else None)
        return NatInfo(NAT_INFO_VERSION, c.nat_type, public_ip,
                       tuple(public[:MAX_INFO_ENDPOINTS]), tuple(private[:MAX_INFO_ENDPOINTS]),
                       c.port_step or 0, preserving)
