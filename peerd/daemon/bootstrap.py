"""Keep the daemon connected to its bootstrap addresses, with backoff.

A bootstrap peer may start after us, restart, or be briefly unreachable: each
address gets its own task that dials until it holds a session, then checks
every ``CHECK_INTERVAL`` and redials (with exponential backoff) once the
session is gone.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from peerd.config import format_address
from peerd.errors import PeerdError
from peerd.identity import PeerId
from peerd.log import event

log = logging.getLogger("peerd.daemon")

CHECK_INTERVAL = 2.0


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``attempt`` (0-based): first * factor^attempt, capped."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.first * self.factor ** min(attempt, 64))


async def resolve(address: tuple[str, int]) -> tuple[str, int]:
    """A numeric address for ``address`` (bootstrap entries may be host names,
    e.g. compose service names; QUIC needs the IP the replies come from)."""
    host, port = address
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    ipv4 = [i for i in infos if i[0] == socket.AF_INET]
    sockaddr = (ipv4 or infos)[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


async def keep_connected(node: Any, address: tuple[str, int], counters: Counter[str],
                         backoff: Backoff = Backoff()) -> None:
    """Run until cancelled: hold a session to ``address``."""
    text = format_address(address)
    peer: PeerId | None = None
    failures = 0
    while True:
        if peer is None or peer not in node.peers():
            try:
                peer = await node.connect(await resolve(address))
            except (PeerdError, OSError) as exc:
                counters["bootstrap_failed"] += 1
                delay = backoff.delay(failures)
                failures += 1
                event(log, "bootstrap.retry", logging.INFO if failures < 4 else logging.WARNING,
                      addr=text, error=exc, retry_in=f"{delay:.1f}s")
                await trio.sleep(delay)
                continue
            failures = 0
            counters["bootstrap_ok"] += 1
            event(log, "bootstrap.connected", addr=text, peer=peer.short)
        await trio.sleep(CHECK_INTERVAL)
