"""Punch packets and the dialing plans built from candidates (pure).

A punch packet shares the node's UDP socket with QUIC. Its first byte is 0x00,
so the QUIC fixed bit (0x40) is clear and the demultiplexer can route it here
with one comparison. Layout::

    b"\\x00pdP" | kind (1 byte) | token (16 bytes)

``token`` is the session token both ends agreed on through the common peer;
it ties a packet to one punch session (QUIC authenticates the path later).

Also here: target lists with port prediction for sequential allocators, and
the capped birthday-probing plan for one endpoint-dependent NAT.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from nat.endpoint import Endpoint, NatType

MAGIC = b"\x00pdP"
TOKEN_BYTES = 16
PACKET_BYTES = len(MAGIC) + 1 + TOKEN_BYTES
MAX_TARGETS = 32  # punch packets per dial are bounded whatever the peer sent
LOWEST_EPHEMERAL = 1024


class ProbeKind(enum.IntEnum):
    PROBE = 1
    ACK = 2


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    token: bytes


def encode_probe(kind: ProbeKind, token: bytes) -> bytes:
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"token must be {TOKEN_BYTES} bytes")
    return MAGIC + bytes([kind]) + token


def is_probe_packet(data: bytes) -> bool:
    """Cheap demultiplexing test: QUIC packets never start with 0x00."""
    return data[:4] == MAGIC


def parse_probe_untrusted(data: bytes) -> Probe | None:
    """The probe in ``data``, or None for anything that is not a valid probe."""
    if len(data) != PACKET_BYTES or not is_probe_packet(data):
        return None
    try:
        kind = ProbeKind(data[len(MAGIC)])
    except ValueError:
        return None
    return Probe(kind, bytes(data[len(MAGIC) + 1 :]))


def dial_targets(
    candidates: Iterable[Endpoint],
    nat_type: NatType,
    port_step: int,
    predicted: int,
) -> tuple[Endpoint, ...]:
    """Where to send punch packets: every candidate, then, for an
    endpoint-dependent peer with a sequential allocator, the next ``predicted``
    ports after each public candidate. Deduplicated, order kept, capped."""
    out: dict[Endpoint, None] = {}
    cands = list(candidates)
    for ep in cands:
        out[ep] = None
    if nat_type is NatType.HARD and port_step != 0:
        for ep in cands:
            if ep.is_lan:
                continue
            for i in range(1, predicted + 1):
                port = ep.port + i * port_step
                if 1 <= port <= 65535:
                    out[Endpoint(ep.ip, port)] = None
    return tuple(out)[:MAX_TARGETS]


@dataclass(frozen=True)
class BirthdayPlan:
    """The hard side opens ``hard_sockets`` sockets, each sending to the easy
    side's public endpoint; the easy side sends one probe to each port in
    ``probe_ports`` at the hard side's public IP."""

    hard_sockets: int
    probe_ports: tuple[int, ...]
    success_probability: float


def birthday_success(hard_sockets: int, probes: int, port_space: int) -> float:
    """P(at least one probe hits one of the hard side's fresh mappings), for
    mappings and probes spread uniformly over ``port_space`` ports."""
    if hard_sockets <= 0 or probes <= 0:
        return 0.0
    miss = 1.0 - min(hard_sockets, port_space) / port_space
    return 1.0 - math.exp(probes * math.log(miss)) if miss > 0 else 1.0


def birthday_plan(
    rng: random.Random,
    *,
    hard_sockets: int = 256,
    max_probes: int = 1024,
    low: int = LOWEST_EPHEMERAL,
    high: int = 65535,
) -> BirthdayPlan:
    """Distinct random probe ports, never more than ``max_probes`` of them.

    With the defaults (256 sockets, 1024 probes over 64512 ports) the chance
    of a hit is about 98%; two hard NATs would need ~170k probes, so the
    strategy relays instead of calling this for S-S.
    """
    if not 1 <= low <= high <= 65535:
        raise ValueError("bad port range")
    space = high - low + 1
    count = max(0, min(max_probes, space))
    ports = tuple(rng.sample(range(low, high + 1), count))
    return BirthdayPlan(
        hard_sockets=hard_sockets,
        probe_ports=ports,
        success_probability=birthday_success(hard_sockets, count, space),
    )
