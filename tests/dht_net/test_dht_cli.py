"""`peerd dht put` / `peerd dht get` through the real CLI against real daemons."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from peerd.daemon.launcher import start_daemon, stop_all
from peerd.identity import SwarmKey


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerd.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_put_on_one_daemon_get_on_another(tmp_path: Path) -> None:
    key = tmp_path / "swarm.key"
    SwarmKey.generate().save(key)
    a = start_daemon(tmp_path / "a", key)
    b = start_daemon(tmp_path / "b", key, bootstrap=(a.listen,))
    c = start_daemon(tmp_path / "c", key, bootstrap=(a.listen,))
    try:
        put = cli("dht", "put", "run/announce", "hello-volunteers", "--socket", str(b.socket))
        assert put.returncode == 0, put.stderr
        got = cli("dht", "get", "run/announce", "--socket", str(c.socket))
        assert got.returncode == 0, got.stderr
        assert "hello-volunteers" in got.stdout
        missing = cli("dht", "get", "run/nothing-here", "--socket", str(c.socket))
        assert missing.returncode != 0 or "hello-volunteers" not in missing.stdout
    finally:
        stop_all([a, b, c], signal.SIGKILL)
