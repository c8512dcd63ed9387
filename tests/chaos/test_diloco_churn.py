"""The churn soak the issue asks for: DiLoCo training across real daemons while
peers are killed, stalled and join (tests/chaos/diloco_soak.py)."""

from __future__ import annotations

import json

from tests.chaos.diloco_soak import KINDS, check_reports, run_diloco_soak
from tests.chaos.harness import env_seconds


def _rep(step: int, parts: list[str], state: str = "s", **kw: object) -> dict[str, object]:
    return {"outer_step": step, "global_step": 4 * step, "state": state, "params": state,
            "participants": parts, "sync_bytes_received": 0, "skipped": False, **kw}


def test_report_checker_catches_each_violation() -> None:
    """The invariant checker is only worth something if it can fail."""
    good = {p: [_rep(1, ["a", "b"]), _rep(2, ["a", "b"])] for p in "ab"}
    violations: list[str] = []
    assert sorted(check_reports(good, {"a", "b"}, {"a": 1, "b": 1}, violations)) == [1, 2]
    assert violations == []
    bad = {"a": [_rep(1, ["a", "b", "c"]), _rep(2, ["a", "b", "c"]), _rep(2, ["a", "b", "c"])],
           "b": [_rep(1, ["a", "b", "c"]), _rep(2, ["a", "b", "c"], state="x"),
                 _rep(3, ["a", "b"])],
           "c": []}
    bad["b"][1]["global_step"] = 7
    check_reports(bad, {"a", "b", "c"}, {"a": 1, "b": 1, "c": 1}, violations)
    text = " | ".join(violations)
    for expected in ("not consecutive", "state differs", "never reported", "training lost",
                     "global_step differs"):
        assert expected in text, (expected, text)
    # A member that died right after round 1 committed may miss reporting it...
    died = {"a": [_rep(1, ["a", "b", "c"])], "b": [_rep(1, ["a", "b", "c"])], "c": []}
    ok: list[str] = []
    check_reports(died, {"a", "b"}, {"a": 1, "b": 1, "c": 1}, ok)
    assert ok == []
    # ...but not one that is still alive.
    check_reports(died, {"a", "b", "c"}, {"a": 1, "b": 1, "c": 1}, ok)
    assert any("never reported" in v for v in ok), ok
    # c restarted (same identity, a second life "c#1") and rejoined at step 3.
    both = {"a": [_rep(s, ["a", "b", "c"] if s != 2 else ["a", "b"]) for s in (1, 2, 3)],
            "b": [_rep(s, ["a", "b", "c"] if s != 2 else ["a", "b"]) for s in (1, 2, 3)],
            "c": [_rep(1, ["a", "b", "c"])], "c#1": [_rep(3, ["a", "b", "c"])]}
    lives: list[str] = []
    firsts = {"a": 1, "b": 1, "c": 1, "c#1": 3}
    assert sorted(check_reports(both, {"a", "b", "c#1"}, firsts, lives)) == [1, 2, 3]
    assert lives == []
    both["c#1"] = [_rep(4, ["a", "b", "c"])]  # the new life missed step 3
    check_reports(both, {"a", "b", "c#1"}, {**firsts, "c#1": 4}, lives)
    assert any("step 3" in v and "never reported" in v for v in lives), lives


def test_diloco_churn_soak() -> None:
    """Kills, joins, stalls and restarts while DiLoCo trains, for PEERD_CHAOS_DILOCO_SECONDS
    (default 100): every survivor bit-identical after every outer step."""
    seconds = env_seconds("PEERD_CHAOS_DILOCO_SECONDS", 100.0)
    report, curve = run_diloco_soak(seconds, seed=int(env_seconds("PEERD_CHAOS_SEED", 5)),
                                    log=print)
    print("\nDiLoCo chaos soak:", report.summary())
    print(json.dumps({"recoveries": [round(r, 2) for r in report.recoveries],
                      "loss_first": curve[0] if curve else None,
                      "loss_last": curve[-1] if curve else None}))
    assert report.violations == [], report.violations
    assert set(report.by_kind) == set(KINDS), report.summary()
    assert report.faults_survived == report.faults_injected, report.summary()
    assert len(curve) >= 2 * report.faults_injected and curve[-1] < curve[0], curve
