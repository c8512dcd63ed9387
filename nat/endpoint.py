"""Addresses and NAT kinds shared by every NAT traversal core (pure data).

``Endpoint`` is an (ip, port) pair validated on construction; it is also a wire
message, so candidate lists travel inside punch messages with the same
validation. ``NatType`` is the coarse class the path strategy works with; the
finer RFC 4787 mapping/filtering behaviours live in ``nat.classify``.

Wire type ids 700-719 belong to the ``nat`` package.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from peerd.wire import message

# Networks whose addresses never appear on the public internet. Python's
# ``is_private`` also counts documentation prefixes (203.0.113.0/24 ...) as
# private, which is wrong for us: the lab uses them as its "internet".
_LAN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # carrier-grade NAT shared space
        "169.254.0.0/16",
        "127.0.0.0/8",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)


def is_lan_address(ip: str) -> bool:
    """True for addresses that only make sense inside a local network."""
    addr = ipaddress.ip_address(ip)
    return any(addr.version == net.version and addr in net for net in _LAN_NETWORKS)


@message(700)
@dataclass(frozen=True, order=True)
class Endpoint:
    """A transport address. ``ip`` is normalised (``::ffff:1.2.3.4`` stays v6)."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, str) or len(self.ip) > 64:
            raise ValueError(f"bad ip {self.ip!r}")
        try:
            normal = str(ipaddress.ip_address(self.ip))
        except ValueError:
            raise ValueError(f"bad ip {self.ip!r}") from None
        object.__setattr__(self, "ip", normal)
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise ValueError(f"bad port {self.port!r}")

    @property
    def is_lan(self) -> bool:
        return is_lan_address(self.ip)

    def as_tuple(self) -> tuple[str, int]:
        """The ``(host, port)`` form socket APIs take."""
        return (self.ip, self.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class NatType(enum.IntEnum):
    """Coarse reachability class used to choose a path (our lab's P / E / S)."""

    UNKNOWN = 0
    PUBLIC = 1  # reachable at its observed address without help
    EASY = 2  # endpoint-independent mapping, filtered: needs a coordinated punch
    HARD = 3  # endpoint-dependent mapping ("symmetric"): a new port per destination
