"""The path strategy, exhaustively over the lab's NAT types."""

from __future__ import annotations

import itertools

import pytest

from nat.endpoint import Endpoint, NatType
from nat.strategy import PathKind, PeerInfo, plan_paths, same_nat

P, E, S, U = NatType.PUBLIC, NatType.EASY, NatType.HARD, NatType.UNKNOWN
K = PathKind

# (local, remote, same NAT) -> expected kinds before the relay. "Same NAT" only
# exists between NATed peers; for P it means "same public IP", which is not a NAT.
EXPECTED: dict[tuple[NatType, NatType, bool], tuple[PathKind, ...]] = {
    (P, P, False): (K.DIRECT_PUBLIC,),
    (P, E, False): (K.REVERSE,),
    (P, S, False): (K.REVERSE,),
    (E, P, False): (K.DIRECT_PUBLIC,),
    (S, P, False): (K.DIRECT_PUBLIC,),
    (E, E, False): (K.PUNCH,),
    (E, S, False): (K.BIRTHDAY,),
    (S, E, False): (K.BIRTHDAY,),
    (S, S, False): (),
    (E, E, True): (K.DIRECT_PRIVATE, K.PUNCH),
    (E, S, True): (K.DIRECT_PRIVATE, K.BIRTHDAY),
    (S, E, True): (K.DIRECT_PRIVATE, K.BIRTHDAY),
    (S, S, True): (K.DIRECT_PRIVATE,),
}


def peer(kind: NatType, n: int, shared: bool, step: int = 0) -> PeerInfo:
    ip = "198.51.100.50" if shared and kind is not P else f"198.51.100.{n}"
    private = () if kind is P else (Endpoint(f"10.{n}.0.2", 5000),)
    return PeerInfo(kind, ip, private, (Endpoint(ip, 5000 + n),), step)


@pytest.mark.parametrize(("local_t", "remote_t", "shared"), list(EXPECTED))
@pytest.mark.parametrize("relay", [True, False])
def test_table(local_t: NatType, remote_t: NatType, shared: bool, relay: bool) -> None:
    local, remote = peer(local_t, 1, shared), peer(remote_t, 2, shared)
    plan = plan_paths(local, remote, relay_available=relay)
    want = EXPECTED[(local_t, remote_t, shared)] + ((K.RELAY,) if relay else ())
    assert tuple(a.kind for a in plan) == want
    for attempt in plan:
        if attempt.kind is K.DIRECT_PRIVATE:
            assert attempt.targets == remote.private
        elif attempt.kind in (K.DIRECT_PUBLIC, K.PUNCH, K.BIRTHDAY):
            assert attempt.targets == remote.public
        else:
            assert attempt.targets == ()


def test_table_covers_every_combination() -> None:
    combos = {(a, b, s) for a, b in itertools.product((P, E, S), repeat=2) for s in (False, True)}
    meaningful = {c for c in combos if not (c[2] and P in c[:2])}
    assert meaningful == set(EXPECTED)


@pytest.mark.parametrize(("local_t", "remote_t"), [(P, P), (P, E), (E, P), (P, S)])
def test_public_peers_sharing_an_ip_are_not_same_nat(local_t: NatType, remote_t: NatType) -> None:
    local = PeerInfo(local_t, "198.51.100.9", (Endpoint("10.0.0.2", 1),))
    remote = PeerInfo(remote_t, "198.51.100.9", (Endpoint("10.0.0.3", 1),))
    assert not same_nat(local, remote)
    assert K.DIRECT_PRIVATE not in {a.kind for a in plan_paths(local, remote)}


def test_sequential_hard_peer_gets_a_predicted_punch_first() -> None:
    plan = plan_paths(peer(E, 1, False), peer(S, 2, False, step=2))
    assert [a.kind for a in plan] == [K.PUNCH_PREDICTED, K.BIRTHDAY, K.RELAY]
    plan = plan_paths(peer(S, 1, False, step=1), peer(E, 2, False))
    assert [a.kind for a in plan] == [K.PUNCH_PREDICTED, K.BIRTHDAY, K.RELAY]


def test_birthday_can_be_disabled() -> None:
    plan = plan_paths(peer(E, 1, False), peer(S, 2, False), allow_birthday=False)
    assert [a.kind for a in plan] == [K.RELAY]


def test_unknown_types_try_everything_cheap() -> None:
    for local_t, remote_t in [(U, E), (E, U), (U, U), (S, U)]:
        remote = peer(remote_t, 2, False)
        plan = plan_paths(peer(local_t, 1, False), remote)
        assert [a.kind for a in plan] == [K.DIRECT_PUBLIC, K.PUNCH, K.RELAY]
        assert plan[1].targets == remote.private + remote.public


def test_unknown_remote_without_addresses_still_punches_then_relays() -> None:
    plan = plan_paths(peer(E, 1, False), PeerInfo(U, None))
    assert [a.kind for a in plan] == [K.PUNCH, K.RELAY]
