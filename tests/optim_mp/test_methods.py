"""Each outer optimizer on 3 real daemons with one training process each: the loss
falls, and after every outer step all members hold bit-identical shared state (and,
except in Streaming DiLoCo, whose local weights are mixed, identical parameters)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.optim_mp.checks import agreed_steps, losses
from tests.optim_mp.harness import TrainingSwarm, Worker

# One job per method; every worker trains them one after the other (one torch
# start-up per peer instead of one per peer and method).
JOBS: dict[str, dict[str, Any]] = {
    "diloco": {"method": "diloco", "steps": 24, "sync_every": 4},
    "sparseloco": {"method": "sparseloco", "steps": 24, "sync_every": 4,
                   "outer": {"density": 1 / 16}},
    "streaming": {"method": "streaming", "steps": 24, "sync_every": 4,
                  "outer": {"fragments": 2, "overlap": 1}},
    "spes": {"method": "spes", "steps": 24, "sync_every": 4},
}
MARGIN = {"diloco": 0.5, "sparseloco": 0.2, "streaming": 0.5, "spes": 0.3}


@pytest.fixture(scope="module")
def trained() -> Iterator[tuple[TrainingSwarm, list[Worker]]]:
    with TrainingSwarm(3, runs=tuple(JOBS)) as sw:
        jobs = [{"run": run, **job} for run, job in JOBS.items()]
        workers = [sw.start_worker(d, *jobs) for d in sw.daemons]
        sw.wait_finished(workers, timeout=240)
        yield sw, workers


@pytest.mark.parametrize("method", list(JOBS))
def test_loss_falls_and_members_are_bit_identical_every_outer_step(
        trained: tuple[TrainingSwarm, list[Worker]], method: str) -> None:
    _, workers = trained
    by_member = {w.first("connected", method)["peer"]: w.outer(method)  # type: ignore[index]
                 for w in workers}
    agreed = agreed_steps(by_member, params_identical=method != "streaming")
    job = JOBS[method]
    rounds = job["steps"] // job["sync_every"] * (2 if method == "streaming" else 1)
    assert sorted(agreed) == list(range(1, rounds + 1))
    assert all(len(reports) == rounds for reports in by_member.values())
    curve = losses(agreed)
    assert curve[-1] < curve[0] - MARGIN[method], curve
    for w in workers:
        done = w.first("done", method)
        assert done is not None and done["train_loss_end"] < done["train_loss_start"]
