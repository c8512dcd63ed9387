"""Invariants over the workers' outer-step reports (pure: lists of dicts in, errors out).

``agreed_steps`` is the heart of every test in this directory: it fails on
any outer step at which two reporters disagree, on a step applied twice or
skipped by one member, and on a round whose participants are not exactly the
members that reported it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

Report = dict[str, Any]


def check_monotone(reports: list[Report], first: int = 1) -> None:
    """One member's outer steps go first, first+1, ...: never applied twice, none lost."""
    steps = [r["outer_step"] for r in reports]
    assert steps == list(range(first, first + len(steps))), steps
    inner = [r["global_step"] for r in reports]
    assert inner == sorted(set(inner)), inner


def agreed_steps(by_member: dict[str, list[Report]], *, params_identical: bool = True,
                 start: dict[str, int] | None = None,
                 in_flight: dict[str, int] | None = None) -> dict[int, Report]:
    """Check every member's reports of one run and return one agreed report per step.

    ``by_member`` maps peer id -> that member's "outer" reports in order;
    ``start`` gives a member's first outer step when it is not 1 (a joiner).
    At each step every reporter has the same global inner step, shared-state
    hash and (unless ``params_identical`` is False, as in Streaming DiLoCo,
    whose local weights are mixed) parameter hash; the round's participants
    are exactly the reporters; and no member had to download shared state in
    the round's sync, so they were bit-identical before the sync repaired
    anything.

    ``in_flight`` maps a member that stopped to the outer step whose collective
    was in flight then (Streaming DiLoCo's overlapped fragment round): its
    daemon may have completed that collective with it before it stopped, so it
    may be among that step's participants without reporting the step.
    """
    at: dict[int, dict[str, Report]] = defaultdict(dict)
    for member, reports in by_member.items():
        check_monotone(reports, (start or {}).get(member, 1))
        for r in reports:
            at[r["outer_step"]][member] = r
    agreed: dict[int, Report] = {}
    for step, reps in sorted(at.items()):
        keys = ["global_step", "state"] + (["params"] if params_identical else [])
        for key in keys:
            values = {m: r[key] for m, r in reps.items()}
            assert len(set(values.values())) == 1, f"step {step}: {key} differs: {values}"
        stopped = {m for m, when in (in_flight or {}).items() if when == step and m not in reps}
        for member, r in reps.items():
            took_part = set(r["participants"])
            assert len(took_part) == len(r["participants"]), (step, member, r["participants"])
            assert set(reps) <= took_part <= set(reps) | stopped, (
                step, member, r["participants"])
            assert r["sync_bytes_received"] == 0, (step, member, "state drifted")
            assert not r["skipped"], (step, member)
        agreed[step] = next(iter(reps.values()))
    return agreed


def losses(agreed: dict[int, Report]) -> list[float]:
    return [agreed[s]["loss"] for s in sorted(agreed)]
