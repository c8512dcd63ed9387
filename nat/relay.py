"""Relay policy and circuit accounting, and the relayed-to-direct upgrade (pure).

A reachable member may relay between two peers that cannot connect directly.
``Relay`` decides which circuits to open and paces every forwarded chunk:
a cap on concurrent circuits (total and per peer), a token bucket per circuit
and one for the relay as a whole, a maximum circuit lifetime and an optional
byte cap. The relay only ever sees ciphertext; these limits keep it from being
turned into free bulk transit.

``PathUpgrade`` is the per-peer decision on the two ends: stay on the relay
until a punch succeeds, then move to the direct path, and close the circuit
only after everything sent over it has been delivered, so no message is lost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nat.bucket import TokenBucket
from nat.endpoint import Endpoint


@dataclass(frozen=True)
class RelayLimits:
    max_circuits: int = 16
    max_circuits_per_peer: int = 4
    circuit_rate: float = 256 * 1024  # bytes/s per circuit
    circuit_burst: float = 64 * 1024
    total_rate: float = 4 * 1024 * 1024  # bytes/s over all circuits
    total_burst: float = 256 * 1024
    max_duration: float = 3600.0  # seconds a circuit may live
    max_circuit_bytes: int | None = None  # None: no byte cap (rate still applies)


class Refusal(enum.Enum):
    TOO_MANY_CIRCUITS = "too many circuits"
    TOO_MANY_FOR_PEER = "too many circuits for this peer"
    SAME_PEER = "a circuit needs two different peers"
    UNKNOWN_CIRCUIT = "unknown or closed circuit"
    DURATION = "circuit lifetime exceeded"
    BYTES = "circuit byte limit exceeded"


@dataclass(frozen=True)
class Opened:
    circuit: int


@dataclass(frozen=True)
class Refused:
    reason: Refusal


@dataclass(frozen=True)
class Forward:
    """Send the chunk after ``delay`` seconds."""

    delay: float


@dataclass
class _Circuit:
    a: str
    b: str
    opened_at: float
    bucket: TokenBucket
    bytes: int = 0


@dataclass(frozen=True)
class RelayStats:
    open_circuits: int
    opened_total: int
    refused_total: int
    closed_total: int
    bytes_total: int
    bytes_by_circuit: dict[int, int] = field(default_factory=dict)


class Relay:
    """Admission and pacing for the circuits one relay node carries."""

    def __init__(self, limits: RelayLimits | None = None, now: float = 0.0) -> None:
        self.limits = limits or RelayLimits()
        self._total = TokenBucket(self.limits.total_rate, self.limits.total_burst, now)
        self._circuits: dict[int, _Circuit] = {}
        self._next_id = 1
        self._opened = self._refused = self._closed = self._bytes = 0

    def open(self, a: str, b: str, now: float) -> Opened | Refused:
        """Ask for a circuit between peers ``a`` and ``b`` (peer id text)."""
        refusal = self._admission(a, b)
        if refusal is not None:
            self._refused += 1
            return Refused(refusal)
        cid = self._next_id
        self._next_id += 1
        bucket = TokenBucket(self.limits.circuit_rate, self.limits.circuit_burst, now)
        self._circuits[cid] = _Circuit(a, b, now, bucket)
        self._opened += 1
        return Opened(cid)

    def _admission(self, a: str, b: str) -> Refusal | None:
        if a == b:
            return Refusal.SAME_PEER
        if len(self._circuits) >= self.limits.max_circuits:
            return Refusal.TOO_MANY_CIRCUITS
        for peer in (a, b):
            held = sum(peer in (c.a, c.b) for c in self._circuits.values())
            if held >= self.limits.max_circuits_per_peer:
                return Refusal.TOO_MANY_FOR_PEER
        return None

    def forward(self, circuit: int, nbytes: int, now: float) -> Forward | Refused:
        """Account one chunk on ``circuit``; a refusal closes the circuit."""
        c = self._circuits.get(circuit)
        if c is None:
            return Refused(Refusal.UNKNOWN_CIRCUIT)
        if now - c.opened_at > self.limits.max_duration:
            self.close(circuit)
            return Refused(Refusal.DURATION)
        cap = self.limits.max_circuit_bytes
        if cap is not None and c.bytes + nbytes > cap:
            self.close(circuit)
            return Refused(Refusal.BYTES)
        c.bytes += nbytes
        self._bytes += nbytes
        delay = max(c.bucket.reserve(nbytes, now), self._total.reserve(nbytes, now))
        return Forward(delay)

    def close(self, circuit: int) -> bool:
        if self._circuits.pop(circuit, None) is None:
            return False
        self._closed += 1
        return True

    def expire(self, now: float) -> tuple[int, ...]:
        """Close and return every circuit past its lifetime."""
        old = tuple(
            cid
            for cid, c in self._circuits.items()
            if now - c.opened_at > self.limits.max_duration
        )
        for cid in old:
            self.close(cid)
        return old

    def next_expiry(self) -> float | None:
        if not self._circuits:
            return None
        return min(c.opened_at for c in self._circuits.values()) + self.limits.max_duration

    def statistics(self) -> RelayStats:
        return RelayStats(
            open_circuits=len(self._circuits),
            opened_total=self._opened,
            refused_total=self._refused,
            closed_total=self._closed,
            bytes_total=self._bytes,
            bytes_by_circuit={cid: c.bytes for cid, c in self._circuits.items()},
        )


# ------------------------------------------------------------ upgrade decision


class PathState(enum.Enum):
    NONE = "none"
    RELAYED = "relayed"
    MIGRATING = "migrating"  # direct path up, relay still draining
    DIRECT = "direct"


@dataclass(frozen=True)
class UseRelay:
    pass


@dataclass(frozen=True)
class MigrateToDirect:
    """Send new messages on the direct path at ``remote``; keep reading the relay."""

    remote: Endpoint


@dataclass(frozen=True)
class CloseRelay:
    pass


@dataclass(frozen=True)
class SchedulePunch:
    at: float


UpgradeAction = UseRelay | MigrateToDirect | CloseRelay | SchedulePunch


class PathUpgrade:
    """Which path carries traffic to one peer, and when to switch."""

    def __init__(self, punch_retry: float = 60.0) -> None:
        self.state = PathState.NONE
        self.remote: Endpoint | None = None
        self._retry = punch_retry

    def relay_up(self, now: float) -> list[UpgradeAction]:
        if self.state is not PathState.NONE:
            return []
        self.state = PathState.RELAYED
        return [UseRelay(), SchedulePunch(now)]

    def direct_up(self, remote: Endpoint) -> list[UpgradeAction]:
        """A punch (or a direct dial) succeeded."""
        if self.state in (PathState.DIRECT, PathState.MIGRATING):
            return []
        self.remote = remote
        if self.state is PathState.RELAYED:
            self.state = PathState.MIGRATING
            return [MigrateToDirect(remote)]
        self.state = PathState.DIRECT
        return [MigrateToDirect(remote)]

    def relay_drained(self) -> list[UpgradeAction]:
        """Every message sent over the relay has been acknowledged."""
        if self.state is not PathState.MIGRATING:
            return []
        self.state = PathState.DIRECT
        return [CloseRelay()]

    def direct_lost(self, now: float, relay_available: bool) -> list[UpgradeAction]:
        if self.state not in (PathState.DIRECT, PathState.MIGRATING):
            return []
        self.remote = None
        if relay_available:
            # A migrating peer still holds its circuit: it simply stays on it.
            self.state = PathState.RELAYED
            return [UseRelay(), SchedulePunch(now + self._retry)]
        self.state = PathState.NONE
        return [SchedulePunch(now)]
