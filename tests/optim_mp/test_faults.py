"""DiLoCo across real daemons while peers die (kill -9 of the training process and
its daemon, at a named phase) and join mid-run: survivors keep training, never
disagree on any outer step, never apply a step twice, and a joiner holds the same
shared state as everyone else from its first outer step on."""

from __future__ import annotations

import pytest

from tests.optim_mp.checks import agreed_steps, check_monotone, losses
from tests.optim_mp.harness import TrainingSwarm, Worker

H = 4  # inner steps per outer step
ROUNDS = 7
JOB = {"method": "diloco", "steps": H * ROUNDS, "sync_every": H}
KILL_AFTER = 2  # outer steps completed before the victim dies

# Named phases, as the global inner step at which the victim stops to be killed:
# right after its round KILL_AFTER (the others go on into their inner steps), or
# one inner step before round KILL_AFTER + 1 (the others are already waiting for
# it inside that round's all-reduce).
PHASES = {"after_round": KILL_AFTER * H, "before_reduce": (KILL_AFTER + 1) * H - 1}


def peer_id(w: Worker) -> str:
    event = w.first("connected")
    assert event is not None
    return str(event["peer"])


@pytest.mark.parametrize("phase", list(PHASES))
def test_survivors_agree_after_a_peer_is_killed(phase: str) -> None:
    with TrainingSwarm(3) as sw:
        victim_daemon = sw.daemons[2]
        survivors = [sw.start_worker(d, JOB) for d in sw.daemons[:2]]
        victim = sw.start_worker(victim_daemon, {**JOB, "hold_at": PHASES[phase]})
        held = sw.wait_for("held", victim)
        assert held["outer_step"] == KILL_AFTER
        sw.kill_peer(victim)
        sw.wait_finished(survivors)

    by_member = {peer_id(w): w.outer() for w in [*survivors, victim]}
    # The victim's reports must agree with the survivors' up to its death; after it,
    # every round's participants are exactly the two survivors (agreed_steps).
    agreed = agreed_steps(by_member)
    assert [r["outer_step"] for r in victim.outer()] == list(range(1, KILL_AFTER + 1))
    assert sorted(agreed) == list(range(1, ROUNDS + 1))
    for w in survivors:
        assert len(w.outer()) == ROUNDS  # no round lost or applied twice by a survivor
        assert w.outer()[-1]["global_step"] == H * ROUNDS
    assert len(agreed[KILL_AFTER + 1]["participants"]) == 2
    curve = losses(agreed)
    assert curve[-1] < curve[KILL_AFTER - 1] < curve[0]


def test_joiner_receives_state_and_matches_from_its_first_outer_step() -> None:
    hold = 2 * H  # members wait after round 2 until the joiner is ready to ask
    with TrainingSwarm(3) as sw:
        members = [sw.start_worker(d, {**JOB, "hold_at": hold}) for d in sw.daemons]
        for _ in members:
            assert sw.wait_for("held")["outer_step"] == 2
        joiner = sw.start_worker(sw.add_daemon(), {**JOB, "join": True})
        sw.wait_for("joining", joiner)
        for w in members:
            w.release()
        sw.wait_finished([*members, joiner])

    joined = joiner.first("joined")
    assert joined is not None
    first = joined["outer_step"] + 1  # the joiner's first outer step
    assert 3 <= first <= ROUNDS - 1, joined  # admitted at a boundary after the hold
    by_member = {peer_id(w): w.outer() for w in [*members, joiner]}
    agreed = agreed_steps(by_member, start={peer_id(joiner): first})
    # What it received is the members' state after the outer step it joined at.
    assert joined["state"] == agreed[first - 1]["state"]
    assert len(agreed[first - 1]["participants"]) == 3
    assert len(agreed[ROUNDS]["participants"]) == 4
    check_monotone(joiner.outer(), first)
    assert joiner.outer()[-1]["outer_step"] == ROUNDS
    curve = losses(agreed)
    assert curve[-1] < curve[0] - 0.5
