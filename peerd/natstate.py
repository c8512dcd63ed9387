"""What a node knows about its own reachability, from its peers' eyes.

Every dialled peer tells us in the handshake which address our packets came
from; ``ObservedAddresses`` confirms an address only when independent
observers agree, and ``classify`` turns the observations into a NAT type
(public, endpoint-independent, symmetric) that ``peerd status`` shows and the
DHT address record will carry.
"""

from __future__ import annotations

from collections.abc import Sequence

from nat.classify import Classification, classify
from nat.endpoint import Endpoint
from nat.observed import ObservedAddresses


def _endpoint(addr: tuple[str, int]) -> Endpoint | None:
    try:
        return Endpoint(addr[0], addr[1])
    except ValueError:
        return None  # e.g. port 0 before binding, or a non-IP host


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
