"""The churn soak: rounds of all-reduce while peers are killed, stalled and join.

Shared by the default-suite test (tests/chaos/test_churn.py) and the on-demand
benchmark (benchmarks/chaos.py). The schedule is drawn from a seeded RNG so a
failing run can be replayed with the same seed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from tests.chaos.harness import KILL_PHASES, ChaosReport, ChaosSwarm

MIN_PEERS = 3  # below this a kill would leave a ring of one; join first
MAX_PEERS = 5
STALL_SECONDS = 1.0  # well under the 5 s heartbeat timeout


def run_soak(seconds: float, *, seed: int = 0, start_peers: int = 4,
             log: Callable[[str], None] | None = None) -> ChaosReport:
    """Churn for about ``seconds`` (steps already started finish); returns the report."""
    rng = random.Random(seed)
    with ChaosSwarm(start_peers, seed=seed) as cs:
        deadline = time.monotonic() + seconds
        cs.clean_round()
        while time.monotonic() < deadline and not cs.violations:
            n = len(cs.members)
            roll = rng.random()
            if n < MIN_PEERS or (n < MAX_PEERS and roll < 0.25):
                action = "join"
                cs.join()
            elif roll < 0.60:
                victim = rng.choice(cs.members)
                phase = rng.choice(KILL_PHASES)
                action = f"kill {victim.index} at {phase}"
                cs.kill(victim, phase, retry=rng.random() < 0.7)
            elif roll < 0.75:
                victim = rng.choice(cs.members)
                action = f"stall {victim.index}"
                cs.stall(victim, STALL_SECONDS)
            else:
                action = "clean"
                cs.clean_round()
            if log is not None:
                log(f"[{seconds - (deadline - time.monotonic()):6.1f}s] {action}: "
                    f"{len(cs.members)} members, round {cs.round}")
        # A last clean round: the swarm must still work after the churn.
        cs.clean_round()
        cs.violations  # noqa: B018 - copies the ledger's violations into the report
        return cs.report
