"""Chaos harness: real peer processes, faults at named points, invariants after every step.

A ``ChaosSwarm`` drives ``peerd.peerproc`` children through rounds of
all-reduce. Each step may inject one fault (SIGKILL at a phase, a SIGSTOP
stall, a new peer joining) and is then checked by ``Ledger.check_round``:

* every result is correct over the participants it names (float64 reference)
  and byte-identical across the peers that report it;
* every error is a ``PeerLost`` naming only peers that were actually faulted,
  with the caller's input left intact;
* no round is applied twice by a peer, and every live member has applied
  exactly the committed rounds since it joined (so survivors' states are equal).

Violations are collected as strings rather than raised, so a soak can report
them all; tests assert the list is empty. Every child is stopped by pid in
``close`` (also on failure, via the context manager).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from peerd.peerproc import LocalSwarm, PeerProcess, digest

# Inputs are fp32 in a tensor this size: big enough that reduce-scatter and
# all-gather each take several sends on 3-5 peers (so "r:2" is mid-phase),
# small enough for 2 busy cores.
# Elements per all-reduce; PEERD_CHAOS_SIZE overrides it (e.g. 2_000_000, whose
# 1 MiB blocks go through the I/O-thread data path under PEERD_PEERPROC_DATA_THREADS=1).
DEFAULT_SIZE = int(os.environ.get("PEERD_CHAOS_SIZE", "60000"))
ROUND_TIMEOUT = 90.0  # seconds one step may take before the harness gives up on it
KILL_PHASES = ("before", "r:1", "r:2", "g:1", "g:2")


class FaultKind(Enum):
    KILL = "kill"  # SIGKILL from inside the victim at a named phase
    STALL = "stall"  # SIGSTOP for less than the heartbeat timeout, then SIGCONT
    JOIN = "join"  # a new process joins at the next round boundary


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    detail: str = ""


@dataclass
class ChaosReport:
    rounds: int = 0
    faults_injected: int = 0
    faults_survived: int = 0
    lost_rounds: int = 0  # rounds that ended in an error and had to be rerun
    recoveries: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.recoveries, q)) if self.recoveries else 0.0

    def summary(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.by_kind.items()))
        return (f"rounds completed {self.rounds}, faults injected {self.faults_injected} "
                f"({kinds}), faults survived {self.faults_survived}, rounds rerun "
                f"{self.lost_rounds}, invariant violations {len(self.violations)}, "
                f"recovery p50 {self.percentile(50):.2f}s p99 {self.percentile(99):.2f}s")


def quiet_env() -> dict[str, str]:
    # float32 only: the children skip the multi-second torch import.
    return {"PEERD_PEERPROC_NO_TORCH": "1"}


def peer_factory(key_hex: str, index: int) -> PeerProcess:
    return PeerProcess(key_hex, index, env=quiet_env())


class Ledger:
    """What each peer has applied; checks a round's events against the invariants."""

    def __init__(self, swarm: LocalSwarm, seed: int, size: int, out: Path) -> None:
        self.swarm = swarm
        self.seed = seed
        self.size = size
        self.out = out
        self.committed: list[int] = []
        self.applied: dict[str, list[int]] = {}
        self.joined_at: dict[str, int] = {}
        self.views: dict[int, tuple[str, ...]] = {}  # each revision's members, from results
        self.violations: list[str] = []

    def admit(self, peer: str, from_round: int) -> None:
        self.applied[peer] = []
        self.joined_at[peer] = from_round

    def check_round(self, rnd: int, asked: list[PeerProcess], events: list[dict[str, Any]],
                    faulted: set[str]) -> bool:
        """Check one round; True if it committed (some peer holds a result)."""
        bad = self.violations.append
        results = [(p, e) for p, e in zip(asked, events, strict=True) if e["event"] == "result"]
        for p, e in zip(asked, events, strict=True):
            if e["event"] == "error":
                lost = set(e.get("peers", ()))
                if e.get("kind") != "PeerLost" or not lost or not lost <= faulted:
                    bad(f"round {rnd}: peer {p.index} error names no faulted peer: {e}")
                if not e.get("input_intact", False):
                    bad(f"round {rnd}: peer {p.index} input modified by a failed round")
        for p, e in results:
            if e.get("input_intact") is False:  # None: reduced in place, as asked
                bad(f"round {rnd}: peer {p.index} input modified by a round into out=")
        if not results:
            return False
        shas = {e["sha256"] for _, e in results}
        parts = {tuple(sorted(e["participants"])) for _, e in results}
        if len(shas) != 1 or len(parts) != 1:
            bad(f"round {rnd}: peers disagree: {len(shas)} digests, participants {parts}")
        for _, e in results:
            # One view per revision, over the whole run (``collectives.ballot``).
            members = tuple(e["participants"])
            known = self.views.setdefault(e["revision"], members)
            if known != members:
                bad(f"round {rnd}: two views of revision {e['revision']}: {known} and {members}")
        participants = list(next(iter(parts)))
        reporters = {p.peer for p, _ in results}
        if not reporters <= set(participants):
            bad(f"round {rnd}: a peer reports a result it did not take part in")
        if set(participants) - {p.peer for p in asked}:
            bad(f"round {rnd}: participants outside the asked peers: {participants}")
        first, ev = results[0]
        path = self.out / f"r{rnd}_{first.index}.npy"
        got = np.load(path)
        if digest(got) != ev["sha256"]:
            bad(f"round {rnd}: saved result does not match its reported digest")
        ref = self.swarm.reference(participants, self.seed, rnd, self.size)
        if not np.allclose(got, ref, rtol=1e-5, atol=1e-6):
            err = float(np.max(np.abs(got.astype(np.float64) - ref)))
            bad(f"round {rnd}: result differs from the float64 reference (max err {err:g})")
        for p, _ in results:
            (self.out / f"r{rnd}_{p.index}.npy").unlink(missing_ok=True)
            if rnd in self.applied.get(p.peer, []):
                bad(f"round {rnd}: applied twice by peer {p.index}")
            self.applied.setdefault(p.peer, []).append(rnd)
        self.committed.append(rnd)
        return True

    def check_states(self, members: list[PeerProcess]) -> None:
        """Every live member applied exactly the committed rounds since it joined."""
        for p in members:
            want = [r for r in self.committed if r >= self.joined_at.get(p.peer, 0)]
            if self.applied.get(p.peer, []) != want:
                self.violations.append(
                    f"peer {p.index} applied {self.applied.get(p.peer)} but committed is {want}")


class ChaosSwarm:
    """A swarm of peer processes plus a ledger and a fault injector."""

    def __init__(self, n: int, *, seed: int = 0, size: int = DEFAULT_SIZE) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="peerd-chaos-")
        self.out = Path(self._tmp.name)
        self.swarm = LocalSwarm(n, factory=peer_factory)
        self.members: list[PeerProcess] = list(self.swarm.peers)
        self.ledger = Ledger(self.swarm, seed, size, self.out)
        for p in self.members:
            self.ledger.admit(p.peer, 0)
        self.size = size
        self.seed = seed
        self.round = 0
        self.report = ChaosReport()

    # ------------------------------------------------------------ steps

    def _run_round(self, peers: list[PeerProcess], faulted: set[str], retry: bool = True,
                   ) -> tuple[bool, list[dict[str, Any]]]:
        events = self.swarm.all_reduce(peers, timeout=ROUND_TIMEOUT, size=self.size,
                                       seed=self.seed, round=self.round, retry=retry,
                                       out=str(self.out), into=self.into)
        ok = self.ledger.check_round(self.round, peers, events, faulted)
        return ok, events

    @property
    def into(self) -> bool:
        """Odd rounds reduce into a buffer of each peer's own (``out=``): the
        ring runs in it, so kills there must leave the input whole too."""
        return self.round % 2 == 1

    def clean_round(self) -> bool:
        """One round on the current members, no fault; it must commit."""
        ok, events = self._run_round(self.members, set())
        if not ok or any(e["event"] != "result" for e in events):
            self.ledger.violations.append(f"round {self.round}: clean round failed: {events}")
        return self._finish(ok)

    def _finish(self, ok: bool) -> bool:
        if ok:
            self.round += 1
            self.report.rounds += 1
        else:
            self.report.lost_rounds += 1
        self.ledger.check_states(self.members)
        return ok

    def _fault(self, fault: Fault) -> None:
        self.report.faults_injected += 1
        key = fault.kind.value + (f":{fault.detail}" if fault.kind is FaultKind.KILL else "")
        self.report.by_kind[key] = self.report.by_kind.get(key, 0) + 1

    def _survived(self, t0: float, ok: bool) -> None:
        if ok:
            self.report.faults_survived += 1
            self.report.recoveries.append(time.monotonic() - t0)

    def kill(self, victim: PeerProcess, phase: str, retry: bool = True) -> bool:
        """SIGKILL ``victim`` at ``phase`` of this round; the survivors must
        finish it (retry) or fail naming the victim and then finish it on the
        next view. True once the survivors have committed the round."""
        self._fault(Fault(FaultKind.KILL, phase))
        survivors = [p for p in self.members if p is not victim]
        t0 = time.monotonic()
        victim.send(cmd="allreduce", run=self.swarm.run, size=self.size, seed=self.seed,
                    round=self.round, die_at=phase, retry=retry, out=str(self.out),
                    into=self.into)
        ok, _ = self._run_round(survivors, {victim.peer}, retry)
        victim.proc.wait(timeout=30)
        if victim.proc.returncode != -signal.SIGKILL:
            self.ledger.violations.append(f"victim {victim.index} exited {victim.proc.returncode}")
        self.members = survivors
        if not ok:
            # Inputs were left intact: the same round, rerun on the new view, is exact.
            self.report.lost_rounds += 1
            ok, _ = self._run_round(survivors, {victim.peer})
        self._survived(t0, ok)
        return self._finish(ok)

    def stall(self, victim: PeerProcess, seconds: float) -> bool:
        """SIGSTOP ``victim`` at the start of a round for ``seconds``, then SIGCONT."""
        self._fault(Fault(FaultKind.STALL, f"{seconds:g}"))
        t0 = time.monotonic()
        for p in self.members:
            p.send(cmd="prepare", size=self.size, seed=self.seed, round=self.round)
        for p in self.members:
            p.expect("prepared", timeout=ROUND_TIMEOUT)
        victim.signal(signal.SIGSTOP)
        resume = threading.Timer(seconds, victim.signal, (signal.SIGCONT,))
        resume.start()
        try:
            for p in self.members:
                p.send(cmd="allreduce", run=self.swarm.run, size=self.size, seed=self.seed,
                       round=self.round, retry=True, out=str(self.out), into=self.into)
            events = [p.expect("result", "error", timeout=ROUND_TIMEOUT) for p in self.members]
        finally:
            resume.cancel()
            victim.signal(signal.SIGCONT)
        ok = self.ledger.check_round(self.round, self.members, events, {victim.peer})
        dropped = ok and victim.peer not in next(
            e["participants"] for e in events if e["event"] == "result")
        if dropped:
            # Under heavy load a stall can outlast the heartbeat timeout: the
            # others went on without it, so it is out of the swarm for good.
            victim.signal(signal.SIGKILL)
            victim.proc.wait(timeout=30)
            self.members = [p for p in self.members if p is not victim]
            self.ledger.applied.pop(victim.peer, None)
        self._survived(t0, ok)
        return self._finish(ok)

    def join(self, max_boundaries: int = 20) -> bool:
        """Start a new process and have it admitted at a round boundary."""
        self._fault(Fault(FaultKind.JOIN))
        t0 = time.monotonic()
        joiner = self.swarm.add_peer()
        joiner.send(cmd="join", run=self.swarm.run, timeout=ROUND_TIMEOUT)
        admitted = False
        for _ in range(max_boundaries):
            for p in self.members:
                p.send(cmd="update_view", run=self.swarm.run)
            views = [p.expect("view", timeout=ROUND_TIMEOUT) for p in self.members]
            if len({v["revision"] for v in views}) != 1:
                self.ledger.violations.append(f"members disagree on the view: {views}")
            if joiner.peer in views[0]["view"]:
                admitted = True
                break
        if not admitted:
            joiner.stop()
            self.ledger.violations.append(f"joiner {joiner.index} not admitted")
            return False
        joiner.expect("joined", timeout=ROUND_TIMEOUT)
        self.members.append(joiner)
        self.ledger.admit(joiner.peer, self.round)
        self._survived(t0, True)
        return True

    # ------------------------------------------------------------ lifecycle

    @property
    def violations(self) -> list[str]:
        self.report.violations = self.ledger.violations
        return self.ledger.violations

    def close(self) -> None:
        try:
            self.swarm.close()
        finally:
            self._tmp.cleanup()

    def __enter__(self) -> ChaosSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_pids(swarm: ChaosSwarm) -> list[int]:
    """Children of this swarm that are still running (for cleanup assertions)."""
    return [p.pid for p in swarm.swarm.peers if p.alive()]


def env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))
