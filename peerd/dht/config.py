"""DHT tunables, with the defaults from docs/networking.md (k=20, alpha=3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peerd.dht.records import RecordLimits

# Named deadlines (seconds).
REQUEST_TIMEOUT = 5.0
PING_TIMEOUT = 3.0
STORE_TIMEOUT = 5.0


@dataclass(frozen=True)
class DhtConfig:
    k: int = 20
    alpha: int = 3
    request_timeout: float = REQUEST_TIMEOUT
    ping_timeout: float = PING_TIMEOUT
    store_timeout: float = STORE_TIMEOUT
    # Consecutive failed requests after which a contact leaves the routing table.
    max_failures: int = 2
    # A get() stops once this many holders have answered with values, so that
    # sub-keys announced under one key are merged from several replicas.
    value_quorum: int = 3
    refresh_interval: float = 3600.0
    # After joining, look up a random id in every bucket beyond the nearest neighbour's
    # (Kademlia's join). Large simulations may skip it: the table then fills from the
    # traffic of later joiners and from periodic refresh.
    join_refresh: bool = True
    # How often the maintenance task wakes to expire, republish and refresh.
    maintenance_interval: float = 60.0
    # Publishers re-sign and re-store a record when this fraction of its TTL has passed.
    republish_fraction: float = 0.5
    # Lifetime of this node's signed address record; None disables publishing it.
    node_record_ttl: float | None = 600.0
    max_concurrent_pings: int = 8
    routing_file: str = "dht-routing.bin"
    limits: RecordLimits = field(default_factory=RecordLimits)

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or self.value_quorum < 1:
            raise ValueError("k, alpha and value_quorum must be positive")
        if not 0.0 < self.republish_fraction < 1.0:
            raise ValueError("republish_fraction must be between 0 and 1")
