"""Start and stop local daemon processes (for ``peerd demo``, tests, benchmarks).

``launch_swarm(n, workdir)`` writes a fresh swarm key into ``workdir``, starts
``n`` ``peerd start`` subprocesses on loopback (each with its own data dir and
log file), waits until each answers on its control socket, then has every pair
connect so the swarm is a full mesh. Processes are stopped by pid only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from peerd.client import Client, DaemonUnavailable, connect
from peerd.daemon import protocol as p
from peerd.errors import PeerdError, Timeout
from peerd.identity import SwarmKey

READY_TIMEOUT = 20.0
READY_POLL = 0.05
STOP_TIMEOUT = 10.0


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    socket: Path
    log_path: Path
    peer_id: str = ""
    listen: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs: object) -> Client:
        return connect(self.socket, **kwargs)  # type: ignore[arg-type]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the process (by pid) and wait for it; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                os.kill(self.proc.pid, sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def start_daemon(data_dir: Path, swarm_key: Path, *, listen: str = "127.0.0.1:0",
                 bootstrap: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                 wait: bool = True, prefix: tuple[str, ...] = ()) -> DaemonProcess:
    """``prefix`` wraps the command, e.g. ``("ip", "netns", "exec", NS)``."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = data_dir / "daemon.log"
    args = [*prefix, sys.executable, "-m", "peerd.cli", "start", "--data-dir", str(data_dir),
            "--swarm-key", str(swarm_key), "--listen", listen, *extra]
    if bootstrap:
        args += ["--bootstrap", *bootstrap]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    d = DaemonProcess(proc, data_dir, data_dir / "control.sock", log_path)
    if wait:
        wait_ready(d)
    return d


def wait_ready(d: DaemonProcess, timeout: float = READY_TIMEOUT) -> p.StatusReply:
    """Poll the control socket until the daemon answers ``status`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise PeerdError(f"daemon exited with {d.proc.returncode}:\n{d.log_tail()}")
        try:
            with connect(d.socket, timeout=2.0) as client:
                status = client.status()
        except (DaemonUnavailable, Timeout):
            time.sleep(READY_POLL)
            continue
        d.peer_id, d.listen = status.peer_id, status.listen[0]
        return status
    raise Timeout(f"daemon in {d.data_dir} not ready after {timeout} s:\n{d.log_tail()}")


def launch_swarm(n: int, workdir: Path, extra: tuple[str, ...] = ()) -> list[DaemonProcess]:
    """``n`` daemons on loopback sharing a new swarm key, fully connected."""
    workdir.mkdir(parents=True, exist_ok=True)
    key_path = workdir / "swarm.key"
    if not key_path.exists():
        SwarmKey.generate().save(key_path)
    daemons: list[DaemonProcess] = []
    try:
        for i in range(n):
            daemons.append(start_daemon(workdir / f"node{i}", key_path, extra=extra,
                                        wait=False))
        for d in daemons:
            wait_ready(d)
        for i, d in enumerate(daemons[:-1]):
            with d.client() as client:
                for other in daemons[i + 1:]:
                    client.connect_peer(other.listen)
    except BaseException:
        stop_all(daemons)
        raise
    return daemons


def stop_all(daemons: list[DaemonProcess], sig: int = signal.SIGTERM) -> list[int]:
    """Stop every daemon (by pid) and return their exit codes. All are signalled
    first, so they shut down in parallel. One that cannot be stopped does not
    leave the rest running: every daemon is tried, then the first error raised."""
    for d in daemons:
        if d.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                os.kill(d.proc.pid, sig)
    codes: list[int] = []
    errors: list[Exception] = []
    for d in daemons:
        try:
            codes.append(d.stop(sig))
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return codes
