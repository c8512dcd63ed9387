"""Hostile traffic at a bounded rate: outsiders without the swarm key, raw garbage.

``Disturber`` runs in a background thread for as long as it is started; every
loop is bounded by its stop event and paced by fixed rates, so the flood
cannot starve the machine it runs on.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from peerd.config import parse_address
from peerd.peerproc import PeerProcess

HANDSHAKES_PER_S = 2.0  # full QUIC + auth handshakes from the keyless outsider
DATAGRAMS_PER_S = 200.0  # malformed UDP/QUIC datagrams to the control port
TCP_PER_S = 10.0  # TCP connections carrying garbage to the data port


@dataclass
class DisturbCounts:
    handshakes: int = 0
    handshake_errors: list[str] = field(default_factory=list)
    admitted: int = 0
    datagrams: int = 0
    tcp: int = 0


def garbage_datagram(rng: random.Random) -> bytes:
    """Random bytes, half of them shaped like a QUIC v1 long-header Initial."""
    body = rng.randbytes(rng.randint(1, 1400))
    if rng.random() < 0.5:
        return bytes([0xC0 | rng.randint(0, 3)]) + b"\x00\x00\x00\x01" + body
    return body


class Disturber:
    def __init__(self, outsider: PeerProcess, target_addr: str, data_port: int,
                 seed: int = 0) -> None:
        self.outsider = outsider
        self.target = parse_address(target_addr)
        self.data_port = data_port
        self.rng = random.Random(seed)
        self.counts = DisturbCounts()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=f, daemon=True)
                         for f in (self._handshakes, self._datagrams, self._tcp)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _paced(self, rate: float) -> Any:
        period = 1.0 / rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            yield
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _handshakes(self) -> None:
        addr = f"{self.target[0]}:{self.target[1]}"
        for _ in self._paced(HANDSHAKES_PER_S):
            ev = self.outsider.request(cmd="connect", addr=addr, timeout=60)
            self.counts.handshakes += 1
            if ev["event"] == "connected":
                self.counts.admitted += 1
            else:
                self.counts.handshake_errors.append(ev.get("kind", "?"))

    def _datagrams(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in self._paced(DATAGRAMS_PER_S):
                s.sendto(garbage_datagram(self.rng), self.target)
                self.counts.datagrams += 1

    def _tcp(self) -> None:
        for _ in self._paced(TCP_PER_S):
            try:
                with socket.create_connection((self.target[0], self.data_port), timeout=2) as s:
                    s.sendall(os.urandom(self.rng.randint(1, 8192)))
                self.counts.tcp += 1
            except OSError:
                continue  # the node may reset us; that is its right
