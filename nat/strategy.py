"""Which paths to try to reach a peer, in which order (a pure decision).

Rules (RFC 4787 behaviours, lab types P = public, E = EIM + filtering,
S = endpoint-dependent mapping):

* Same public IP (both behind one NAT): their private addresses first; Linux
  NATs do not hairpin, so the public address would not work between them.
* Remote P: dial it. Local P, remote NATed: ask the remote to dial us
  (connection reversal through the common peer); we answer the observed
  source, not the advertised address.
* E-E: coordinated punch. E-S: a punch with port prediction when the S side's
  allocator is sequential, then capped birthday probing (probabilistic).
  S-S: no direct attempt.
* UNKNOWN on either side: try the cheap direct paths and a punch anyway.
* A relay, when one is known, is always the last resort (and the path used
  while the direct attempts run).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nat.endpoint import Endpoint, NatType


class PathKind(enum.Enum):
    DIRECT_PRIVATE = "direct_private"  # dial the peer's LAN addresses
    DIRECT_PUBLIC = "direct_public"  # dial the peer's public address
    REVERSE = "reverse"  # ask the peer (via a common peer) to dial us
    PUNCH = "punch"  # coordinated simultaneous dial
    PUNCH_PREDICTED = "punch_predicted"  # punch including predicted ports
    BIRTHDAY = "birthday"  # many sockets vs. random probes, capped
    RELAY = "relay"


@dataclass(frozen=True)
class PeerInfo:
    nat_type: NatType
    public_ip: str | None
    private: tuple[Endpoint, ...] = ()
    public: tuple[Endpoint, ...] = ()
    port_step: int = 0  # sequential allocator stride, 0 if none


@dataclass(frozen=True)
class PathAttempt:
    kind: PathKind
    targets: tuple[Endpoint, ...]  # where the dialing side sends (empty for RELAY)


def same_nat(local: PeerInfo, remote: PeerInfo) -> bool:
    """Both sides behind one NAT: they share a public IP and neither is public."""
    return (
        local.public_ip is not None
        and local.public_ip == remote.public_ip
        and NatType.PUBLIC not in (local.nat_type, remote.nat_type)
    )


def plan_paths(
    local: PeerInfo,
    remote: PeerInfo,
    *,
    relay_available: bool = True,
    allow_birthday: bool = True,
) -> tuple[PathAttempt, ...]:
    """The ordered path attempts from ``local`` to ``remote``."""
    out: list[PathAttempt] = []
    if remote.private and same_nat(local, remote):
        out.append(PathAttempt(PathKind.DIRECT_PRIVATE, remote.private))
    out.extend(_internet_paths(local, remote, allow_birthday))
    if relay_available:
        out.append(PathAttempt(PathKind.RELAY, ()))
    return tuple(out)


def _internet_paths(
    local: PeerInfo, remote: PeerInfo, allow_birthday: bool
) -> list[PathAttempt]:
    lt, rt = local.nat_type, remote.nat_type
    pub = remote.public
    if rt is NatType.PUBLIC:
        return [PathAttempt(PathKind.DIRECT_PUBLIC, pub)] if pub else []
    if lt is NatType.PUBLIC:
        return [PathAttempt(PathKind.REVERSE, ())]
    if NatType.UNKNOWN in (lt, rt):
        out = [PathAttempt(PathKind.DIRECT_PUBLIC, pub)] if pub else []
        return [*out, PathAttempt(PathKind.PUNCH, remote.private + pub)]
    if lt is NatType.EASY and rt is NatType.EASY:
        return [PathAttempt(PathKind.PUNCH, pub)]
    if NatType.EASY in (lt, rt):  # one side EASY, the other HARD
        out = []
        hard = remote if rt is NatType.HARD else local
        if hard.port_step != 0:
            out.append(PathAttempt(PathKind.PUNCH_PREDICTED, pub))
        if allow_birthday:
            out.append(PathAttempt(PathKind.BIRTHDAY, pub))
        return out
    return []  # HARD-HARD: ~170k probes for a coin flip; relay instead
