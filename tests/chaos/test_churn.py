"""Churn: faults at named points against real peer processes, invariants after every step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from peerd.peerproc import digest
from tests.chaos.harness import ChaosSwarm, Ledger, env_seconds, live_pids
from tests.chaos.soak import run_soak


class _FakeSwarm:
    """Just enough of LocalSwarm for the ledger: a reference over given inputs."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs = inputs

    def reference(self, participants: list[str], seed: int, rnd: int, size: int) -> np.ndarray:
        return np.mean([self.inputs[p].astype(np.float64) for p in participants], axis=0)


class _Peer:
    def __init__(self, peer: str, index: int) -> None:
        self.peer, self.index = peer, index


def _result(out: Path, peer: _Peer, rnd: int, data: np.ndarray, parts: list[str],
            revision: int = 0) -> dict[str, Any]:
    np.save(out / f"r{rnd}_{peer.index}.npy", data)
    return {"event": "result", "participants": parts, "sha256": digest(data),
            "revision": revision}


def test_ledger_catches_each_kind_of_violation(tmp_path: Path) -> None:
    """The invariant checker is only worth something if it can fail."""
    rng = np.random.default_rng(0)
    inputs = {q: rng.standard_normal(16).astype(np.float32) for q in "abc"}
    peers: list[Any] = [_Peer(q, i) for i, q in enumerate("abc")]
    good = np.mean([inputs[q] for q in "abc"], axis=0).astype(np.float32)
    ledger = Ledger(_FakeSwarm(inputs), 0, 16, tmp_path)  # type: ignore[arg-type]
    for p in peers:
        ledger.admit(p.peer, 0)
    ok = ledger.check_round(0, peers, [_result(tmp_path, p, 0, good, list("abc")) for p in peers],
                            set())
    assert ok and ledger.violations == []
    # Wrong average, bytes differing between peers, an error naming nobody faulted.
    wrong = good + 1e-2
    events = [_result(tmp_path, peers[0], 1, wrong, list("abc")),
              _result(tmp_path, peers[1], 1, good, list("abc")),
              {"event": "error", "kind": "PeerLost", "peers": ["a"], "input_intact": False}]
    ledger.check_round(1, peers, events, {"c"})
    text = " | ".join(ledger.violations)
    assert "disagree" in text and "reference" in text and "no faulted peer" in text
    assert "input modified" in text
    # A round applied twice, and a member that missed a committed round.
    n = len(ledger.violations)
    ledger.check_round(1, peers[:1], [_result(tmp_path, peers[0], 1, good, list("abc"))],
                       set())
    ledger.check_states(peers)
    new = " | ".join(ledger.violations[n:])
    assert "applied twice" in new and "committed is" in new
    # A later round on another view of a revision already seen.
    n = len(ledger.violations)
    ab = np.mean([inputs[q] for q in "ab"], axis=0).astype(np.float32)
    ledger.check_round(2, peers[:2], [_result(tmp_path, p, 2, ab, list("ab")) for p in peers[:2]],
                       set())
    assert "two views of revision 0" in " | ".join(ledger.violations[n:])


def test_each_fault_kind_once() -> None:
    """Kill at every phase kind, a stall, a join: every step passes the invariants."""
    with ChaosSwarm(4, seed=7) as cs:
        assert cs.clean_round()
        assert cs.kill(cs.members[1], "r:2", retry=True)
        assert cs.stall(cs.members[0], 1.0)
        assert cs.join()
        assert cs.kill(cs.members[-1], "g:1", retry=False)  # the joiner, without retry
        assert cs.clean_round()
        assert cs.violations == [], cs.violations
        assert cs.report.faults_survived == cs.report.faults_injected == 4
        assert len(cs.members) >= 3
        pids = [p.pid for p in cs.swarm.peers]
    assert live_pids(cs) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


def test_churn_soak() -> None:
    """Kills, stalls and joins for PEERD_CHAOS_SECONDS (default 45): no violation."""
    seconds = env_seconds("PEERD_CHAOS_SECONDS", 45.0)
    report = run_soak(seconds, seed=int(env_seconds("PEERD_CHAOS_SEED", 3)))
    print("\nchaos soak:", report.summary())
    print(json.dumps({"recoveries": [round(r, 2) for r in report.recoveries]}))
    assert report.violations == [], report.violations
    assert report.faults_injected >= 3, report.summary()
    assert report.faults_survived == report.faults_injected, report.summary()
    # Every kill or stall commits its round; joins happen between rounds.
    assert report.rounds >= report.faults_injected - report.by_kind.get("join", 0)
