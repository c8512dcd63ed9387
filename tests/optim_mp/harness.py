"""Real daemons plus one training process per peer, driven by their JSON event lines.

``TrainingSwarm(n)`` starts ``n`` ``peerd start`` processes on loopback (one
per peer, fully meshed, as ``peerd demo`` does), has them form the runs, and
starts training processes (``worker.run_worker``), each talking to one daemon.
Workers are forked by a multiprocessing forkserver that preloaded torch and
the corpus (``preload.py``), so a worker starts in milliseconds rather than
seconds. Every worker's events arrive on one queue as ``(worker, event)``;
tests wait on those events with a bound (no sleeps) and decide from them when
to kill, hold or release a peer. Every process is stopped by its pid in
``close`` (also on failure).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import multiprocessing.util  # its exit handler must be registered before ours
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from peerd.daemon.launcher import DaemonProcess, launch_swarm, start_daemon, stop_all
from tests.optim_mp.worker import run_worker

EVENT_TIMEOUT = 90.0  # seconds without any event from any worker before a test gives up
RUN = "optim-mp"


@dataclass
class Worker:
    index: int
    daemon: DaemonProcess
    proc: mp.process.BaseProcess
    conn: Connection
    stderr_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def outer(self, run: str = RUN) -> list[dict[str, Any]]:
        """This worker's outer-step reports for ``run``, in order."""
        return [e for e in self.events if e["event"] == "outer" and e["run"] == run]

    def first(self, kind: str, run: str | None = None) -> dict[str, Any] | None:
        return next((e for e in self.events
                     if e["event"] == kind and run in (None, e.get("run"))), None)

    def release(self) -> None:
        """Let a held worker go on (see ``hold_at``)."""
        self.conn.send("go")

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.stderr_path.read_text()[-chars:]
        except OSError:
            return ""


class TrainingSwarm:
    def __init__(self, n: int, runs: tuple[str, ...] = (RUN,),
                 phase_timeout: float | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pom", dir="/tmp"))  # short socket paths
        self.daemons: list[DaemonProcess] = []
        self.workers: list[Worker] = []
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        _OPEN.add(self)
        try:
            self.daemons = launch_swarm(n, self.workdir)
            members = [d.peer_id for d in self.daemons]
            for d in self.daemons:
                with d.client() as c:
                    for run in runs:
                        c.join(members, run=run, phase_timeout=phase_timeout)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ processes

    def add_daemon(self) -> DaemonProcess:
        """A new daemon connected to every earlier one (it has not joined the run)."""
        d = start_daemon(self.workdir / f"node{len(self.daemons)}", self.workdir / "swarm.key")
        self.daemons.append(d)
        self._connect(d)
        return d

    def restart_daemon(self, old: DaemonProcess) -> DaemonProcess:
        """Start a dead daemon again from its data directory (same identity),
        connected to every live daemon."""
        assert old.proc.poll() is not None, "restart only a daemon that is gone"
        d = start_daemon(old.data_dir, self.workdir / "swarm.key")
        self.daemons.append(d)
        self._connect(d)
        return d

    def _connect(self, d: DaemonProcess) -> None:
        with d.client() as c:
            for other in self.daemons:
                if other is not d and other.proc.poll() is None:
                    c.connect_peer(other.listen)

    def start_worker(self, daemon: DaemonProcess, *jobs: dict[str, Any]) -> Worker:
        """A training process on ``daemon`` running ``jobs`` in order (see worker.py);
        a job without "run" trains in ``RUN``."""
        index = len(self.workers)
        full = {"index": index, "jobs": [{"run": RUN, **job} for job in jobs]}
        stderr_path = self.workdir / f"worker{index}.log"
        ours, theirs = _context().Pipe()
        proc = _context().Process(target=run_worker, name=f"optim-mp-worker-{index}",
                                  args=(full, theirs, str(daemon.socket), str(stderr_path)))
        proc.start()
        theirs.close()  # so our end reads EOF once the worker is gone
        w = Worker(index, daemon, proc, ours, stderr_path)
        self.workers.append(w)
        threading.Thread(target=self._read, args=(w,), daemon=True).start()
        return w

    def _read(self, w: Worker) -> None:
        while True:
            try:
                event = w.conn.recv()
            except (EOFError, OSError):
                break
            w.events.append(event)
            self.events.put((w.index, event))
        self.events.put((w.index, {"event": "exit"}))

    def kill_peer(self, w: Worker) -> None:
        """SIGKILL the worker and its daemon (no goodbye to anyone)."""
        for pid in (w.proc.pid, w.daemon.pid):
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        w.proc.join(10)
        w.daemon.proc.wait(10)

    def pause_daemon(self, w: Worker) -> None:
        """SIGSTOP the worker's daemon: it stays connected but answers nothing
        (a stalled process, a laptop asleep). ``close`` ends it even stopped."""
        os.kill(w.daemon.pid, signal.SIGSTOP)

    def resume_daemon(self, w: Worker) -> None:
        os.kill(w.daemon.pid, signal.SIGCONT)

    # ------------------------------------------------------------ events

    def next_event(self, timeout: float = EVENT_TIMEOUT) -> tuple[Worker, dict[str, Any]]:
        try:
            index, event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no worker event within {timeout} s\n{self.tails()}") from None
        w = self.workers[index]
        if event["event"] == "error":
            raise AssertionError(f"worker {index}: {event}\n{self.tails()}")
        return w, event

    def wait_for(self, kind: str, worker: Worker | None = None,
                 timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        """Consume events until ``kind`` arrives (from ``worker`` if given)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} event within {timeout} s\n{self.tails()}")
            w, event = self.next_event(left)
            if event["event"] == kind and (worker is None or w is worker):
                return event
            if event["event"] == "exit":
                w.proc.join(10)
                rc = w.proc.exitcode
                if rc != -signal.SIGKILL and (rc != 0 or w.first("finished") is None):
                    raise AssertionError(f"worker {w.index} exited with {rc}\n{w.stderr_tail()}")

    def wait_finished(self, workers: list[Worker], timeout: float = EVENT_TIMEOUT) -> None:
        """Consume events until every worker in ``workers`` has finished all its jobs."""
        deadline = time.monotonic() + timeout
        while not all(w.first("finished") for w in workers):
            self.wait_for("finished", timeout=deadline - time.monotonic())
        for w in workers:
            w.proc.join(30)
            assert w.proc.exitcode == 0, w.stderr_tail()

    def tails(self) -> str:
        """Recent worker output and daemon logs, for failure messages."""
        parts = [f"-- worker {w.index}:\n{w.stderr_tail(1500)}" for w in self.workers]
        parts += [f"-- daemon {d.peer_id[:12]}:\n{d.log_tail(8)}" for d in self.daemons]
        return "\n".join(parts)

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop every process by pid. Each step runs even if an earlier one
        failed: one leaked training process keeps the test session from ever
        exiting (multiprocessing joins its children at exit)."""
        errors: list[BaseException] = []
        for w in self.workers:
            try:
                if w.proc.is_alive() and w.proc.pid is not None:
                    os.kill(w.proc.pid, signal.SIGKILL)  # also ends a SIGSTOPped one
                w.proc.join(10)
                w.conn.close()
            except Exception as exc:
                errors.append(exc)
        try:
            stop_all(self.daemons)
        except Exception as exc:
            errors.append(exc)
        _OPEN.discard(self)
        if not os.environ.get("OPTIM_MP_KEEP"):  # set it to keep logs for a post-mortem
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> TrainingSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CTX: mp.context.ForkServerContext | None = None
# Swarms not closed yet (held strongly: a swarm nobody references still has
# processes): whatever a test left running is stopped at exit, before
# multiprocessing's own exit handler, registered when multiprocessing.util was
# imported above and so run after this one, would wait for them for ever.
_OPEN: set[TrainingSwarm] = set()


@atexit.register
def _close_leftovers() -> None:
    for sw in list(_OPEN):
        with contextlib.suppress(Exception):
            sw.close()


def _context() -> mp.context.ForkServerContext:
    """The forkserver context; its server imports ``preload`` once per test session."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.optim_mp.preload"])
    return _CTX
