from __future__ import annotations

import heapq
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.endpoint import Endpoint, NatType
from nat.punch import (
    PUNCH_VERSION,
    Action,
    AttemptFailed,
    BackOff,
    Dial,
    HolePunch,
    LocalInfo,
    PunchConfig,
    PunchConnect,
    PunchState,
    PunchSync,
    Role,
    SendViaRelay,
    Succeeded,
)

TOKEN = bytes(range(16))
OTHER = bytes(16)
A_PUB = Endpoint("198.51.100.1", 5000)
B_PUB = Endpoint("198.51.100.2", 6000)
CFG = PunchConfig(max_attempts=3, reply_timeout=2.0, sync_timeout=2.0, punch_timeout=1.0,
                  backoff_initial=10.0, backoff_max=25.0)


def pair() -> tuple[HolePunch, HolePunch]:
    b = HolePunch(Role.INITIATOR, LocalInfo((B_PUB,), NatType.EASY), TOKEN, CFG)
    a = HolePunch(Role.RESPONDER, LocalInfo((A_PUB,), NatType.EASY), TOKEN, CFG)
    return b, a


def relayed(actions: list[Action]) -> PunchConnect | PunchSync:
    sends = [x for x in actions if isinstance(x, SendViaRelay)]
    assert len(sends) == 1, actions
    return sends[0].message


def test_happy_path_dials_both_sides_at_the_same_moment() -> None:
    b, a = pair()
    connect = relayed(b.start(0.0))
    assert isinstance(connect, PunchConnect) and connect.candidates == (B_PUB,)
    assert b.state is PunchState.AWAIT_REPLY and b.deadline == 2.0
    reply = relayed(a.receive(connect, 0.125))  # relay delay 0.125 s each way
    assert isinstance(reply, PunchConnect) and reply.candidates == (A_PUB,)
    assert a.state is PunchState.AWAIT_SYNC
    sync = relayed(b.receive(reply, 0.25))
    assert isinstance(sync, PunchSync)
    assert b.rtt == 0.25
    assert b.deadline == 0.375  # RTT/2 after the sync leaves
    assert b.timer(0.37) == []
    a_dial = a.receive(sync, 0.375)
    b_dial = b.timer(0.375)
    assert a_dial == [Dial(1, (B_PUB,), TOKEN)]
    assert b_dial == [Dial(1, (A_PUB,), TOKEN)]
    assert b.direct_packet(A_PUB, 0.31) == [Succeeded(A_PUB, 1)]
    assert a.direct_packet(B_PUB, 0.31) == [Succeeded(B_PUB, 1)]
    assert b.direct_packet(A_PUB, 0.32) == []  # rest of the burst
    assert b.deadline is None and b.statistics().remote == A_PUB


def fail_attempt(b: HolePunch, a: HolePunch, connect: PunchConnect | PunchSync) -> list[Action]:
    """One attempt whose relay works but whose punch packets never arrive."""
    assert isinstance(connect, PunchConnect) and b.deadline is not None
    t = b.deadline - CFG.reply_timeout  # when the connect left
    reply = relayed(a.receive(connect, t + 0.125))
    relayed(b.receive(reply, t + 0.25))  # the sync
    assert b.deadline == t + 0.375
    assert isinstance(b.timer(b.deadline)[0], Dial)
    assert b.deadline == t + 0.375 + CFG.punch_timeout
    return b.timer(b.deadline)


def test_three_attempts_then_exponential_capped_backoff() -> None:
    b, a = pair()
    msg = relayed(b.start(0.0))
    attempts = itertools.count(1)  # attempt numbers keep growing across rounds
    for round_no, backoff in enumerate((10.0, 20.0, 25.0, 25.0)):
        for in_round in (1, 2, 3):
            attempt = next(attempts)
            assert isinstance(msg, PunchConnect) and msg.attempt == attempt
            out = fail_attempt(b, a, msg)
            assert out[0] == AttemptFailed(attempt, "no direct packet")
            if in_round < 3:
                msg = relayed(out)
        failed_at = b.deadline - backoff if b.deadline is not None else -1.0
        assert out[-1] == BackOff(failed_at + backoff)
        assert b.state is PunchState.BACKOFF and b.statistics().rounds == round_no + 1
        assert b.timer(failed_at + backoff - 0.001) == []
        msg = relayed(b.timer(failed_at + backoff))  # a fresh round starts at attempt 1


def test_reply_timeout_counts_as_an_attempt() -> None:
    b, _ = pair()
    b.start(0.0)
    out = b.timer(2.0)
    assert out[0] == AttemptFailed(1, "no reply through the relay")
    assert relayed(out).attempt == 2


def test_stale_and_foreign_messages_are_ignored() -> None:
    b, a = pair()
    c1 = relayed(b.start(0.0))
    r1 = relayed(a.receive(c1, 0.1))
    b.timer(2.0)  # attempt 1 times out, attempt 2 starts
    assert b.receive(r1, 2.1) == []  # late reply to attempt 1
    assert a.receive(PunchSync(PUNCH_VERSION, 1, OTHER), 2.1) == []  # wrong token
    assert b.receive(PunchSync(PUNCH_VERSION, 2, TOKEN), 2.1) == []  # sync to initiator
    assert b.statistics().ignored_messages == 2
    assert a.statistics().ignored_messages == 1
    assert b.direct_packet(A_PUB, 2.2) == [Succeeded(A_PUB, 2)]  # a direct packet still wins


def test_responder_ignores_direct_packets_before_any_session() -> None:
    _, a = pair()
    assert a.direct_packet(B_PUB, 0.0) == []
    with pytest.raises(RuntimeError):
        a.start(0.0)


def test_responder_returns_to_idle_and_follows_the_next_attempt() -> None:
    b, a = pair()
    relayed(a.receive(relayed(b.start(0.0)), 0.1))
    assert a.timer(2.1) == [AttemptFailed(1, "no sync through the relay")]
    assert a.state is PunchState.IDLE and a.deadline is None
    c2 = relayed(b.timer(2.0))
    assert relayed(a.receive(c2, 2.2)).attempt == 2
    assert a.state is PunchState.AWAIT_SYNC


def test_predicted_ports_of_a_sequential_hard_peer_are_dialed() -> None:
    b = HolePunch(Role.INITIATOR, LocalInfo((B_PUB,), NatType.EASY), TOKEN, CFG)
    c = relayed(b.start(0.0))
    hard = PunchConnect(PUNCH_VERSION, c.attempt, TOKEN, (A_PUB,), NatType.HARD, 1)
    b.receive(hard, 0.25)
    dial = b.timer(0.375)
    assert dial[0] == Dial(1, (A_PUB, *(Endpoint(A_PUB.ip, 5000 + i) for i in range(1, 5))), TOKEN)


@settings(max_examples=60, deadline=None)
@given(
    d_ba=st.floats(0.001, 0.5),
    d_ab=st.floats(0.001, 0.5),
    lost=st.sets(st.integers(0, 8), max_size=3),
)
def test_simulated_relay_keeps_dials_within_half_the_delay_asymmetry(
    d_ba: float, d_ab: float, lost: set[int]
) -> None:
    """A fake network: relay messages delayed (and some lost); timers fire on
    time. Each attempt whose messages all arrive dials both sides within
    |d_ba - d_ab| / 2 of each other."""
    b, a = pair()
    seq = itertools.count()
    queue: list[tuple[float, int, str, object]] = []
    sent = itertools.count()

    def push(actions: list[Action], side: str, now: float) -> None:
        for act in actions:
            if isinstance(act, SendViaRelay) and next(sent) not in lost:
                to, delay = ("a", d_ba) if side == "b" else ("b", d_ab)
                heapq.heappush(queue, (now + delay, next(seq), to, act.message))
            elif isinstance(act, Dial):
                dials.setdefault(act.attempt, {})[side] = now

    dials: dict[int, dict[str, float]] = {}
    push(b.start(0.0), "b", 0.0)
    for _ in range(200):
        timers = [(p.deadline, s) for p, s in ((a, "a"), (b, "b")) if p.deadline is not None]
        next_timer = min(timers) if timers else None
        if queue and (next_timer is None or queue[0][0] <= next_timer[0]):
            now, _, to, msg = heapq.heappop(queue)
            peer = a if to == "a" else b
            push(peer.receive(msg, now), to, now)  # type: ignore[arg-type]
        elif next_timer is not None:
            now, side = next_timer
            push((a if side == "a" else b).timer(now), side, now)
        if b.state is PunchState.BACKOFF:
            break
    both = [d for d in dials.values() if len(d) == 2]
    assert both or lost, "with no loss the first attempt must dial on both sides"
    for d in both:
        assert abs(d["a"] - d["b"]) == pytest.approx(abs(d_ba - d_ab) / 2, abs=1e-9)
    assert b.attempt <= CFG.max_attempts and b.rounds <= 1


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["connect", "sync", "timer", "direct"]),
        st.integers(1, 4),
        st.booleans(),
        st.floats(0.0, 3.0),
    ),
    max_size=30,
)


@settings(max_examples=80, deadline=None)
@given(role=st.sampled_from(list(Role)), events=EVENTS)
def test_arbitrary_event_sequences_keep_invariants(
    role: Role, events: list[tuple[str, int, bool, float]]
) -> None:
    p = HolePunch(role, LocalInfo((A_PUB,), NatType.EASY), TOKEN, CFG)
    now = 0.0
    dials_per_attempt: dict[tuple[int, int], int] = {}
    if role is Role.INITIATOR:
        p.start(now)
    for kind, attempt, good_token, dt in events:
        now += dt
        tok = TOKEN if good_token else OTHER
        if kind == "connect":
            connect = PunchConnect(PUNCH_VERSION, attempt, tok, (B_PUB,), NatType.EASY, 0)
            out = p.receive(connect, now)
        elif kind == "sync":
            out = p.receive(PunchSync(PUNCH_VERSION, attempt, tok), now)
        elif kind == "timer":
            out = p.timer(p.deadline if p.deadline is not None else now)
        else:
            out = p.direct_packet(B_PUB, now)
        for act in out:
            if isinstance(act, Dial):
                key = (p.rounds, act.attempt)
                dials_per_attempt[key] = dials_per_attempt.get(key, 0) + 1
                assert act.targets == (B_PUB,)
        if role is Role.INITIATOR:
            assert p.attempt <= CFG.max_attempts * (p.rounds + 1)
        live = p.state not in (PunchState.IDLE, PunchState.SUCCEEDED)
        assert (p.deadline is not None) == live
    assert all(n == 1 for n in dials_per_attempt.values()) or role is Role.RESPONDER
