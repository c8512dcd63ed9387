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
            action = _pick(cs, rng)
            if log is not None:
                log(f"[{seconds - (deadline - time.monotonic()):6.1f}s] {action[0]} "
                    f"{action[1]}: {len(cs.members)} members, round {cs.round}")
            try:
                _do(cs, action)
            except (TimeoutError, EOFError, AssertionError) as exc:
                # A step that hangs or breaks the driver protocol is a violation,
                # reported with the rest rather than losing the summary.
                cs.ledger.violations.append(f"round {cs.round}: {action} failed: {exc!r}")
                break
        # A last clean round: the swarm must still work after the churn.
        if not cs.violations:
            cs.clean_round()
        cs.violations  # noqa: B018 - copies the ledger's violations into the report
        return cs.report


def _pick(cs: ChaosSwarm, rng: random.Random) -> tuple[str, str]:
    n = len(cs.members)
    roll = rng.random()
    if n < MIN_PEERS or (n < MAX_PEERS and roll < 0.25):
        return ("join", "")
    if roll < 0.60:
        victim = rng.choice(cs.members)
        retry = "retry" if rng.random() < 0.7 else "no-retry"
        return ("kill", f"{victim.index} {rng.choice(KILL_PHASES)} {retry}")
    if roll < 0.75:
        return ("stall", str(rng.choice(cs.members).index))
    return ("clean", "")


def _do(cs: ChaosSwarm, action: tuple[str, str]) -> None:
    kind, detail = action
    by_index = {p.index: p for p in cs.members}
    if kind == "join":
        cs.join()
    elif kind == "kill":
        index, phase, retry = detail.split()
        cs.kill(by_index[int(index)], phase, retry=retry == "retry")
    elif kind == "stall":
        cs.stall(by_index[int(detail)], STALL_SECONDS)
    else:
        cs.clean_round()
