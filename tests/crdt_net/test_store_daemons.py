"""The CRDT store inside real daemons: replication between daemons, and a
daemon SIGKILLed right after acknowledging writes still has them on restart."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from peerd.daemon.launcher import start_daemon, stop_all
from peerd.identity import SwarmKey


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    key = tmp_path / "swarm.key"
    SwarmKey.generate().save(key)
    d = start_daemon(tmp_path / "n", key)
    try:
        with d.client() as c:
            for i in range(50):
                c.store_set("run/crash", f"k{i}", {"step": i})  # returns once acknowledged
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=10)
        d = start_daemon(tmp_path / "n", key)
        with d.client() as c:
            doc = c.store_get("run/crash")
        assert doc == {f"k{i}": {"step": i} for i in range(50)}
    finally:
        stop_all([d], signal.SIGKILL)


def test_writes_replicate_between_daemons(tmp_path: Path) -> None:
    key = tmp_path / "swarm.key"
    SwarmKey.generate().save(key)
    a = start_daemon(tmp_path / "a", key)
    b = start_daemon(tmp_path / "b", key, bootstrap=(a.listen,))
    try:
        with a.client() as ca:
            ca.store_set("run/cfg", "lr", 0.25)
        with b.client() as cb:
            cb.store_set("run/cfg", "batch", 64)
        deadline = time.monotonic() + 30
        want = {"lr": 0.25, "batch": 64}
        while True:
            with a.client() as ca, b.client() as cb:
                got = (ca.store_get("run/cfg"), cb.store_get("run/cfg"))
            if got == (want, want):
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.1)  # polling another process's state: no event crosses the boundary
    finally:
        stop_all([a, b], signal.SIGKILL)
