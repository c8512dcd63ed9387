"""The invariant checks themselves fail on the faults they exist to catch."""

from __future__ import annotations

from typing import Any

import pytest

from tests.optim_mp.checks import agreed_steps


def report(step: int, members: list[str], **changes: Any) -> dict[str, Any]:
    r = {"outer_step": step, "global_step": 4 * step, "state": f"s{step}", "params": f"p{step}",
         "participants": members, "sync_bytes_received": 0, "skipped": False, "loss": 5.0 - step}
    return {**r, **changes}


def run(n: int = 3, steps: int = 3) -> dict[str, list[dict[str, Any]]]:
    members = [f"m{i}" for i in range(n)]
    return {m: [report(s, members) for s in range(1, steps + 1)] for m in members}


def test_consistent_reports_pass() -> None:
    assert sorted(agreed_steps(run())) == [1, 2, 3]


@pytest.mark.parametrize(("key", "value"), [("state", "x"), ("params", "x"), ("global_step", 9)])
def test_one_member_differing_at_one_step_fails(key: str, value: object) -> None:
    reports = run()
    reports["m1"][1] = {**reports["m1"][1], key: value}
    with pytest.raises(AssertionError, match="differs"):
        agreed_steps(reports)


def test_streaming_may_differ_in_params_only() -> None:
    reports = run()
    reports["m1"][1] = {**reports["m1"][1], "params": "mixed"}
    agreed_steps(reports, params_identical=False)


@pytest.mark.parametrize("steps", [[1, 2, 2, 3], [1, 3], [2, 3]])
def test_a_step_applied_twice_or_lost_fails(steps: list[int]) -> None:
    reports = run()
    reports["m2"] = [report(s, ["m0", "m1", "m2"]) for s in steps]
    with pytest.raises(AssertionError):
        agreed_steps(reports)


def test_participants_must_be_exactly_the_reporters() -> None:
    reports = run()
    del reports["m2"]  # m2 vanished but the others still claim it took part
    with pytest.raises(AssertionError):
        agreed_steps(reports)


def test_a_repairing_sync_counts_as_drift() -> None:
    reports = run()
    reports["m0"][2] = {**reports["m0"][2], "sync_bytes_received": 1024}
    with pytest.raises(AssertionError, match="drifted"):
        agreed_steps(reports)


def test_a_stopped_member_may_appear_only_in_the_round_in_flight_when_it_stopped() -> None:
    reports = run(steps=3)
    gone = reports.pop("m2")[:1]  # m2 reported step 1 only, then stopped
    for r in reports["m0"][1:2] + reports["m1"][1:2]:
        r["participants"] = ["m0", "m1", "m2"]  # its daemon finished step 2 with it
    for r in reports["m0"][2:] + reports["m1"][2:]:
        r["participants"] = ["m0", "m1"]
    reports["m2"] = gone
    assert sorted(agreed_steps(reports, in_flight={"m2": 2})) == [1, 2, 3]
    with pytest.raises(AssertionError):
        agreed_steps(reports)  # without the allowance: not exactly the reporters
    with pytest.raises(AssertionError):
        agreed_steps(reports, in_flight={"m2": 3})  # only the step that was in flight
    reports["m0"][2]["participants"] = ["m0", "m1", "m2"]
    with pytest.raises(AssertionError):
        agreed_steps(reports, in_flight={"m2": 2})  # claimed again a step later
