"""20 real daemons on loopback: DHT bootstrap from one seed, put/get across
them, and the DHT keeps working after the seed is SIGKILLed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from peerd.daemon.launcher import DaemonProcess, start_daemon, stop_all, wait_ready
from peerd.identity import SwarmKey

N = 20
# A daemon answers ``status`` before its DHT has joined (the join starts with its
# first session and runs in the background). Peers count as joined once they hold
# sessions with half the swarm: the join's self-lookup is what opens those.
JOINED_PEERS = N // 2
JOIN_TIMEOUT = 120.0
JOIN_POLL = 0.5


def wait_joined(daemons: list[DaemonProcess]) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    for d in daemons:
        while True:
            with d.client(timeout=60) as c:
                if len(c.status().peers) >= JOINED_PEERS:
                    break
            assert time.monotonic() < deadline, f"{d.data_dir} did not join the DHT"
            time.sleep(JOIN_POLL)


@pytest.fixture
def swarm(tmp_path: Path):  # type: ignore[no-untyped-def]
    key = tmp_path / "swarm.key"
    SwarmKey.generate().save(key)
    daemons: list[DaemonProcess] = []
    try:
        seed = start_daemon(tmp_path / "seed", key)
        daemons.append(seed)
        for i in range(1, N):
            daemons.append(start_daemon(tmp_path / f"n{i}", key, bootstrap=(seed.listen,),
                                        wait=False))
        for d in daemons[1:]:
            wait_ready(d, timeout=120)
        wait_joined(daemons)
        yield daemons
    finally:
        stop_all(daemons, signal.SIGKILL)


def test_twenty_daemons_put_get_and_survive_seed_loss(swarm: list[DaemonProcess]) -> None:
    seed, rest = swarm[0], swarm[1:]
    for i, d in enumerate(rest[:10]):
        with d.client(timeout=60) as c:
            assert c.dht_put(f"run/{i}", {"from": i, "payload": "x" * i}, ttl=600) >= 1
    for i in range(10):
        reader = rest[(i * 7 + 3) % len(rest)]
        with reader.client(timeout=60) as c:
            assert c.dht_get(f"run/{i}") == {None: {"from": i, "payload": "x" * i}}

    seed.proc.send_signal(signal.SIGKILL)
    seed.proc.wait(timeout=10)

    for i, d in enumerate(rest[10:]):
        with d.client(timeout=60) as c:
            assert c.dht_put(f"after/{i}", i, ttl=600) >= 1
    for i in range(len(rest) - 10):
        reader = rest[(i * 5 + 1) % len(rest)]
        with reader.client(timeout=60) as c:
            assert c.dht_get(f"after/{i}") == {None: i}
            # Values stored before the seed died are still found.
            assert c.dht_get(f"run/{i}") == {None: {"from": i, "payload": "x" * i}}
    with rest[0].client(timeout=60) as c:
        assert c.dht_get("never/stored") == {}
