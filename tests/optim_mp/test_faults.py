"""Outer optimizers across real daemons while peers die (kill -9 of the training
process and its daemon, at a named phase) and join mid-run: survivors keep
training, never disagree on any outer step, never apply a step twice, and a joiner
holds the same shared state as everyone else from its first outer step on.

DiLoCo runs by default; the other optimizers (and DiLoCo's "skip" policy) are
marked slow: ``pytest -m slow tests/optim_mp``.
"""

from __future__ import annotations

from typing import Any

import pytest

from peerd.client import Client
from peerd.errors import Evicted
from tests.daemon.conftest import wait_until
from tests.optim_mp.checks import agreed_steps, check_monotone, losses
from tests.optim_mp.harness import RUN, TrainingSwarm, Worker

H = 4  # inner steps per outer step
ROUNDS = 7
KILL_AFTER = 2  # outer rounds completed before the victim dies

# Named phases, as the global inner step at which the victim stops to be killed:
# right after its round KILL_AFTER (the others go on into their inner steps), or
# one inner step before round KILL_AFTER + 1 (the others are already waiting for
# it inside that round's collective).
PHASES = {"after_round": KILL_AFTER * H, "before_reduce": (KILL_AFTER + 1) * H - 1}

JOBS: dict[str, dict[str, Any]] = {
    "diloco": {"method": "diloco"},
    "sparseloco": {"method": "sparseloco", "outer": {"density": 1 / 16}},
    # Two fragments: a fragment round every H / 2 steps, so outer steps count twice.
    "streaming": {"method": "streaming", "outer": {"fragments": 2, "overlap": 1}},
    "spes": {"method": "spes"},
}
SLOW = pytest.mark.slow
# DiLoCo in the default suite, the other optimizers on demand (-m slow).
EVERY_METHOD = pytest.mark.parametrize("method", [
    "diloco",
    pytest.param("sparseloco", marks=SLOW),
    pytest.param("streaming", marks=SLOW),
    pytest.param("spes", marks=SLOW),
])


def job(method: str, **extra: Any) -> dict[str, Any]:
    return {"steps": H * ROUNDS, "sync_every": H, **JOBS[method], **extra}


def per_round(method: str) -> int:
    """Outer steps per H inner steps."""
    return 2 if method == "streaming" else 1


def in_flight(method: str, member: str, last: int) -> dict[str, int]:
    """The overlapped round in flight when ``member`` stopped after outer step
    ``last`` (see ``agreed_steps``): Streaming DiLoCo's next fragment round."""
    return {member: last + 1} if method == "streaming" else {}


def peer_id(w: Worker) -> str:
    event = w.first("connected")
    assert event is not None
    return str(event["peer"])


@pytest.mark.parametrize(("method", "phase"), [
    ("diloco", "before_reduce"),
    pytest.param("diloco", "after_round", marks=SLOW),  # ends in the same abort, later
    pytest.param("sparseloco", "before_reduce", marks=SLOW),
    pytest.param("streaming", "before_reduce", marks=SLOW),
    pytest.param("spes", "before_reduce", marks=SLOW),
])
def test_survivors_agree_after_a_peer_is_killed(method: str, phase: str) -> None:
    k = per_round(method)
    with TrainingSwarm(3) as sw:
        survivors = [sw.start_worker(d, job(method)) for d in sw.daemons[:2]]
        victim = sw.start_worker(sw.daemons[2], job(method, hold_at=PHASES[phase]))
        held = sw.wait_for("held", victim)
        sw.kill_peer(victim)
        sw.wait_finished(survivors)

    # The victim's reports must agree with the survivors' up to its death; after it,
    # every round's participants are exactly the two survivors (agreed_steps), but
    # for Streaming DiLoCo's round in flight then, which it may have completed.
    by_member = {peer_id(w): w.outer() for w in [*survivors, victim]}
    last = held["outer_step"]  # in Streaming DiLoCo one more fragment round ends first
    overlapped = in_flight(method, peer_id(victim), last)
    agreed = agreed_steps(by_member, params_identical=method != "streaming",
                          in_flight=overlapped)
    assert KILL_AFTER * k <= last < (KILL_AFTER + 1) * k
    assert [r["outer_step"] for r in victim.outer()] == list(range(1, last + 1))
    assert sorted(agreed) == list(range(1, ROUNDS * k + 1))
    for w in survivors:
        assert len(w.outer()) == ROUNDS * k  # no round lost or applied twice by a survivor
        assert w.outer()[-1]["global_step"] == H * ROUNDS
    assert len(agreed[last + 1 + len(overlapped)]["participants"]) == 2
    curve = losses(agreed)
    assert curve[-1] < curve[last - 1] < curve[0], curve


@SLOW
@pytest.mark.parametrize("method", ["diloco", "sparseloco"])
def test_skip_policy_drops_the_interrupted_round_on_every_survivor(method: str) -> None:
    with TrainingSwarm(3) as sw:
        spec = job(method, outer={**JOBS[method].get("outer", {}), "on_peer_lost": "skip"})
        survivors = [sw.start_worker(d, spec) for d in sw.daemons[:2]]
        victim = sw.start_worker(sw.daemons[2], {**spec, "hold_at": PHASES["before_reduce"]})
        sw.wait_for("held", victim)
        sw.kill_peer(victim)
        sw.wait_finished(survivors)

    skipped = [[r for r in w.outer() if r["skipped"]] for w in survivors]
    # Both drop the round the victim never joined, and keep the state from before it.
    assert [[r["global_step"] for r in s] for s in skipped] == [[(KILL_AFTER + 1) * H]] * 2
    applied = {peer_id(w): [r for r in w.outer() if not r["skipped"]]
               for w in [*survivors, victim]}
    agreed = agreed_steps(applied)
    assert sorted(agreed) == list(range(1, ROUNDS))
    for s in skipped:
        assert s[0]["outer_step"] == KILL_AFTER
        assert s[0]["state"] == agreed[KILL_AFTER]["state"]
        assert s[0]["params"] == agreed[KILL_AFTER]["params"]


@EVERY_METHOD
def test_joiner_receives_state_and_matches_from_its_first_outer_step(method: str) -> None:
    k = per_round(method)
    hold = 2 * H  # members wait after round 2 until the joiner is about to ask
    with TrainingSwarm(3) as sw:
        members = [sw.start_worker(d, job(method, hold_at=hold)) for d in sw.daemons]
        for _ in members:
            assert sw.wait_for("held")["outer_step"] == 2 * k
        joiner = sw.start_worker(sw.add_daemon(), job(method, join=True))
        sw.wait_for("joining", joiner)
        for w in members:
            w.release()
        sw.wait_finished([*members, joiner])

    joined = joiner.first("joined")
    assert joined is not None
    first = joined["outer_step"] + 1  # the joiner's first outer step
    assert 2 * k < first <= (ROUNDS - 1) * k, joined  # admitted after the hold, in time
    by_member = {peer_id(w): w.outer() for w in [*members, joiner]}
    agreed = agreed_steps(by_member, params_identical=method != "streaming",
                          start={peer_id(joiner): first})
    # What it received is the members' state after the outer step it joined at.
    assert joined["state"] == agreed[first - 1]["state"]
    assert len(agreed[first - 1]["participants"]) == 3
    assert len(agreed[ROUNDS * k]["participants"]) == 4
    check_monotone(joiner.outer(), first)
    assert joiner.outer()[-1]["outer_step"] == ROUNDS * k
    curve = losses(agreed)
    assert curve[-1] < curve[0], curve


@EVERY_METHOD
def test_a_member_stopped_past_the_heartbeat_timeout_rejoins_and_trains_on(method: str) -> None:
    """The victim's daemon is SIGSTOPped just before round KILL_AFTER + 1; the
    others drop it after the heartbeat timeout and go on. Resumed once they have
    moved two rounds further, its training process gets ``Evicted`` from that
    round, rejoins at the round's sync, receives the run's state and trains on
    from the run's step: from then on it agrees with the others at every step."""
    with TrainingSwarm(3) as sw:
        survivors, victim, held = away_and_back(sw, method, pause_daemon=True)
    assert_rejoined_and_agrees(method, survivors, victim, held)


@EVERY_METHOD
def test_a_training_process_stuck_past_the_phase_timeout_is_left_out_and_rejoins(
        method: str) -> None:
    """The victim's training process stops just before round KILL_AFTER + 1
    (hung, or a slower GPU) while its daemon runs on and heartbeats; the others,
    waiting for it in that round's collective, go on without it once the run's
    phase timeout (2 s here) passes, every one of them naming it. Released, it
    gets ``Evicted``, rejoins at the round's sync and trains on in agreement."""
    with TrainingSwarm(3, phase_timeout=2.0) as sw:
        survivors, victim, held = away_and_back(sw, method, pause_daemon=False)
    assert_rejoined_and_agrees(method, survivors, victim, held)


AWAY = KILL_AFTER + 3  # the survivors' round when the victim comes back


def away_and_back(sw: TrainingSwarm, method: str,
                  pause_daemon: bool) -> tuple[list[Worker], Worker, dict[str, Any]]:
    """The victim stops at PHASES["before_reduce"] (its daemon SIGSTOPped too
    with ``pause_daemon``) until the survivors reach round AWAY; then all
    finish. Returns the survivors, the victim and its "held" event."""
    k = per_round(method)
    survivors = [sw.start_worker(d, job(method, hold_at=AWAY * H)) for d in sw.daemons[:2]]
    victim = sw.start_worker(sw.daemons[2], job(method, hold_at=PHASES["before_reduce"]))
    held = sw.wait_for("held", victim)
    if pause_daemon:
        sw.pause_daemon(victim)
    for _ in survivors:  # in either order: wait_for drops the other workers' events
        assert sw.wait_for("held")["outer_step"] == AWAY * k
    if pause_daemon:
        sw.resume_daemon(victim)
    else:
        # Its daemon, alive all along, learns from the others' heartbeat answers
        # that they went on without it (as a resumed one does at once).
        with sw.daemons[2].client(run=RUN) as c:
            wait_until(lambda: evicted(c))
    victim.release()
    for w in survivors:
        w.release()
    sw.wait_finished([*survivors, victim])
    return survivors, victim, held


def evicted(c: Client) -> bool:
    try:
        c.view()
    except Evicted:
        return True
    return False


def assert_rejoined_and_agrees(method: str, survivors: list[Worker], victim: Worker,
                               held: dict[str, Any]) -> None:
    k = per_round(method)
    same_params = method != "streaming"  # whose local weights are mixed, not replaced
    reports = victim.outer()
    last = held["outer_step"]
    before = [r for r in reports if r["outer_step"] <= last]
    rejoin, *after = reports[len(before):]
    # One round dropped (the one it was evicted from); its sync received the state
    # the others reached, at their global step, no step applied twice.
    assert rejoin["skipped"] and rejoin["sync_bytes_received"] > 0, rejoin
    assert rejoin["outer_step"] > AWAY * k and after, reports
    me = peer_id(victim)
    overlapped = in_flight(method, me, last)
    # Up to its stop, and from its first step after rejoining, it agrees with the others.
    agreed = agreed_steps({peer_id(w): w.outer()[:last] for w in survivors} | {me: before},
                          params_identical=same_params)
    agreed |= agreed_steps({peer_id(w): w.outer()[last:] for w in survivors} | {me: after},
                           params_identical=same_params,
                           start={peer_id(w): last + 1 for w in survivors}
                           | {me: rejoin["outer_step"] + 1},
                           in_flight=overlapped)
    for key in ("global_step", "state") + (("params",) if same_params else ()):
        assert rejoin[key] == agreed[rejoin["outer_step"]][key], key
    assert sorted(agreed) == list(range(1, ROUNDS * k + 1))
    for step in range(last + 1 + len(overlapped), rejoin["outer_step"] + 1):
        assert len(agreed[step]["participants"]) == 2  # the survivors went on alone
    assert len(agreed[ROUNDS * k]["participants"]) == 3
    assert after[-1]["outer_step"] == ROUNDS * k and after[-1]["global_step"] == H * ROUNDS
    curve = losses(agreed)
    assert curve[-1] < curve[0], curve
