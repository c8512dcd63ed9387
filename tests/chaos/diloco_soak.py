"""The DiLoCo churn soak: real ``peerd start`` daemons and training processes
(``tests.optim_mp``) train the tiny GPT with DiLoCo while peers are killed
(SIGKILL of the training process and its daemon), stalled (SIGSTOP of a daemon,
then SIGCONT) and new ones join.

Faults rotate kill -> join -> stall -> restart (kill, then the same identity
and data directory start again and rejoin), each injected right after a round so the
phase is named: ``after_round`` (the victim has reported outer step k and is
in its inner steps; the others are too). After each fault the soak waits for
recovery: the first round that every live member reports with exactly the live
members as participants (for a join: the joiner included). Recovery times feed
the percentiles. ``check_reports`` then checks every outer step of the run:
all reporters agree on the global step, the shared-state hash and the
parameter hash; nobody applied a step twice or skipped one; the global step
advanced by exactly H per outer step (no training step lost); every
participant of a round reported it, unless it died right after that round
committed; no member ever had to repair drifted state.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peerd.daemon.launcher import DaemonProcess
from tests.chaos.harness import ChaosReport
from tests.optim_mp.harness import TrainingSwarm, Worker

H = 4  # inner steps per outer step
MIN_LIVE = 3  # a kill leaves at least two, who keep a quorum
MAX_LIVE = 5
STALL_SECONDS = 1.0  # well under the heartbeat timeout: nobody may be dropped
RECOVERY_TIMEOUT = 90.0
CLEAN_ROUNDS = 2  # full rounds between faults, so each recovery is measured alone
JOB = {"method": "diloco", "steps": H * 100_000, "sync_every": H}
# "restart": the same identity and data directory in a new process, at once
# (a crashed volunteer's machine coming back); survivors tell it from the dead
# process by its incarnation (peerd/handshake.py, collectives/incarnation.py).
KINDS = ("kill", "join", "stall", "restart")

Report = dict[str, Any]


@dataclass
class Member:
    worker: Worker
    peer: str | None = None
    first: int | None = None  # its first outer step (None: a joiner not yet admitted)
    alive: bool = True

    def outer(self) -> list[Report]:
        return self.worker.outer()

    def last(self) -> int:
        reports = self.outer()
        return reports[-1]["outer_step"] if reports else 0


class DilocoSoak:
    def __init__(self, sw: TrainingSwarm, rng: random.Random,
                 log: Callable[[str], None] | None) -> None:
        self.sw, self.rng, self.log = sw, rng, log
        self.members: dict[int, Member] = {}
        self.report = ChaosReport()
        self.started = time.monotonic()

    # ------------------------------------------------------------ events

    def _pump(self, timeout: float) -> None:
        """Take one worker event (or none within ``timeout``) and account for it."""
        try:
            index, event = self.sw.events.get(timeout=timeout)
        except queue.Empty:
            return
        m = self.members[index]
        kind = event["event"]
        if kind == "connected":
            m.peer = event["peer"]
        elif kind == "joined":
            m.first = event["outer_step"] + 1
        elif kind in ("error", "exit") and m.alive:
            detail = event.get("message", "") or m.worker.stderr_tail(800)
            where = event.get("trace", "")[-600:]  # where it came from, for the report
            self.report.violations.append(f"worker {index} failed: {kind} {detail}"
                                          + (f"\n{where}" if where else ""))
            m.alive = False

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.alive]

    def _full_round_after(self, mark: int) -> bool:
        """Has every live member reported one round after ``mark`` whose
        participants are exactly the live members?"""
        live = self.live()
        if any(m.peer is None or m.first is None for m in live):
            return False
        peers = sorted(m.peer for m in live if m.peer is not None)
        common = min(m.last() for m in live)
        for step in range(mark + 1, common + 1):
            reps = [next(r for r in m.outer() if r["outer_step"] == step) for m in live
                    if m.first is not None and m.first <= step]
            if len(reps) == len(live) and all(sorted(r["participants"]) == peers
                                              for r in reps):
                return True
        return False

    def wait_full_round(self, timeout: float = RECOVERY_TIMEOUT) -> bool:
        """Wait for a round with every live member after the latest one reported now."""
        mark = max((m.last() for m in self.members.values()), default=0)
        deadline = time.monotonic() + timeout
        while not self._full_round_after(mark):
            if time.monotonic() > deadline or self.report.violations:
                return False
            self._pump(min(1.0, max(0.0, deadline - time.monotonic())))
        return True

    def wait_any_round(self) -> Member:
        """The member that reports the next outer step (the fault's phase)."""
        seen = {i: m.last() for i, m in self.members.items()}
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while time.monotonic() < deadline and not self.report.violations:
            self._pump(1.0)
            for i, m in self.members.items():
                if m.alive and m.first is not None and m.last() > seen[i]:
                    return m
        raise AssertionError("no member reported an outer step")

    # ------------------------------------------------------------ faults

    def start_member(self, joining: bool, daemon: DaemonProcess | None = None) -> Member:
        if joining and daemon is None:
            daemon = self.sw.add_daemon()
        job = {**JOB, "join": True} if joining else JOB
        w = self.sw.start_worker(daemon or self.sw.daemons[len(self.members)], job)
        m = Member(w, first=None if joining else 1)
        self.members[w.index] = m
        return m

    def inject(self, kind: str) -> None:
        live = [m for m in self.live() if m.first is not None]
        if kind in ("kill", "restart") and len(live) < MIN_LIVE:
            kind = "join"
        if kind == "join" and len(self.live()) >= MAX_LIVE:
            kind = "stall"
        phase_member = self.wait_any_round()  # named phase: right after a round
        t0 = time.monotonic()
        if kind == "kill":
            m = phase_member if self.rng.random() < 0.5 else self.rng.choice(live)
            m.alive = False
            self.sw.kill_peer(m.worker)
            detail = f"worker {m.worker.index} after_round {phase_member.last()}"
        elif kind == "join":
            m = self.start_member(joining=True)
            detail = f"worker {m.worker.index}"
        elif kind == "restart":
            # A volunteer's machine crashes and comes back: same identity and
            # data directory, a new process that joins the run again.
            m = self.rng.choice(live)
            m.alive = False
            self.sw.kill_peer(m.worker)
            back = self.start_member(joining=True, daemon=self.sw.restart_daemon(m.worker.daemon))
            detail = f"worker {m.worker.index} as worker {back.worker.index}"
        else:
            m = self.rng.choice(live)
            os.kill(m.worker.daemon.pid, signal.SIGSTOP)
            try:
                deadline = t0 + STALL_SECONDS
                while (left := deadline - time.monotonic()) > 0:
                    self._pump(left)  # keep accounting while the daemon is stopped
            finally:
                os.kill(m.worker.daemon.pid, signal.SIGCONT)
            detail = f"daemon of worker {m.worker.index} for {STALL_SECONDS:g}s"
        self.report.faults_injected += 1
        self.report.by_kind[kind] = self.report.by_kind.get(kind, 0) + 1
        recovered = self.wait_full_round()
        if recovered:
            self.report.faults_survived += 1
            self.report.recoveries.append(time.monotonic() - t0)
        else:
            self.report.violations.append(f"no full round within {RECOVERY_TIMEOUT:g}s "
                                          f"after {kind} {detail}")
        if self.log is not None:
            outcome = f"recovered in {self.report.recoveries[-1]:.2f}s" if recovered \
                else "NOT recovered"
            self.log(f"[{time.monotonic() - self.started:6.1f}s] {kind} {detail}: "
                     f"{outcome}, {len(self.live())} live")


def run_diloco_soak(seconds: float, *, seed: int = 0, start_peers: int = 4,
                    log: Callable[[str], None] | None = None,
                    kinds: tuple[str, ...] = KINDS) -> tuple[ChaosReport, list[float]]:
    """Churn for about ``seconds``; returns the report and the agreed held-out losses."""
    rng = random.Random(seed)
    with TrainingSwarm(start_peers) as sw:
        soak = DilocoSoak(sw, rng, log)
        for _ in range(start_peers):
            soak.start_member(joining=False)
        deadline = time.monotonic() + seconds
        ok = soak.wait_full_round()
        turn = 0
        while ok and time.monotonic() < deadline and not soak.report.violations:
            soak.inject(kinds[turn % len(kinds)])
            turn += 1
            for _ in range(CLEAN_ROUNDS):
                ok = ok and soak.wait_full_round()
        # The swarm must still train after the churn.
        if not soak.wait_full_round():
            soak.report.violations.append("no full round after the last fault")
        keys: dict[int, str] = {}
        lives: defaultdict[str, int] = defaultdict(int)
        for i, m in soak.members.items():
            peer = m.peer or f"worker{i}"
            keys[i] = peer if not lives[peer] else f"{peer}#{lives[peer]}"
            lives[peer] += 1
        members = soak.members
        reports = {keys[i]: list(m.outer()) for i, m in members.items()}
        alive = {keys[i] for i, m in members.items() if m.alive}
        firsts = {keys[i]: m.first or 1 for i, m in members.items()}
    agreed = check_reports(reports, alive, firsts, soak.report.violations)
    soak.report.rounds = len(agreed)
    return soak.report, [agreed[s]["loss"] for s in sorted(agreed)]


def _peer(key: str) -> str:
    return key.split("#", 1)[0]


def check_reports(reports: dict[str, list[Report]], alive: set[str], firsts: dict[str, int],
                  violations: list[str]) -> dict[int, Report]:
    """Check every member's outer-step reports (pure); append what is wrong to
    ``violations``; return one report per step every live member reached.

    Keys are peer ids; a later life of the same identity (a restarted daemon)
    is keyed ``peer#n``. ``alive`` and ``firsts`` use the same keys."""
    common = min((rs[-1]["outer_step"] for p, rs in reports.items() if p in alive and rs),
                 default=0)
    last = {p: (rs[-1]["outer_step"] if rs else firsts[p] - 1) for p, rs in reports.items()}
    at: dict[int, dict[str, Report]] = defaultdict(dict)
    for peer, rs in reports.items():
        steps = [r["outer_step"] for r in rs]
        if steps != list(range(firsts[peer], firsts[peer] + len(steps))):
            violations.append(f"{peer[:8]}: outer steps {steps[:3]}... not consecutive from "
                              f"{firsts[peer]} (a step lost or applied twice)")
        for r in rs:
            if r["outer_step"] <= common:
                at[r["outer_step"]][peer] = r
    agreed: dict[int, Report] = {}
    for step, reps in sorted(at.items()):
        for key in ("global_step", "state", "params"):
            if len({r[key] for r in reps.values()}) != 1:
                violations.append(f"step {step}: {key} differs between members")
        if any(r["global_step"] != step * H for r in reps.values()):
            violations.append(f"step {step}: global step is not {step * H} (training lost)")
        parts = {tuple(sorted(r["participants"])) for r in reps.values()}
        if len(parts) != 1:
            violations.append(f"step {step}: members disagree on who took part: {parts}")
        for p in set().union(*parts) - {_peer(k) for k in reps}:
            # Fine only for a life that died right after the round committed.
            if not any(_peer(k) == p and k not in alive and last[k] == step - 1
                       for k in reports):
                violations.append(f"step {step}: {p[:8]} took part but never reported it")
        for peer, r in reps.items():
            if r["sync_bytes_received"] or r["skipped"]:
                violations.append(f"step {step}: {peer[:8]} had drifted or skipped")
        agreed[step] = next(iter(reps.values()))
    return agreed
