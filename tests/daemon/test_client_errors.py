"""A daemon's error reaches its client as the same class, with the same text."""

from __future__ import annotations

import pytest

from peerd.client.conn import error_from
from peerd.daemon import protocol as p
from peerd.errors import ConfigError, Evicted, PeerdError, PeerLost, RemoteError


def reply_for(exc: PeerdError) -> p.CtlError:
    """What the daemon's service answers for ``exc`` (``service._dispatch``)."""
    return p.CtlError(7, type(exc).__name__, str(exc), tuple(getattr(exc, "peers", ())))


@pytest.mark.parametrize("exc", [
    PeerLost(["pb", "pa"], "heartbeat timeout"),
    Evicted("pme", "the run went on without this peer after revision 3"),
    ConfigError("shape (3,) does not match (4,)"),
])
def test_the_client_raises_what_the_daemon_raised(exc: PeerdError) -> None:
    got = error_from(reply_for(exc))
    assert type(got) is type(exc)
    assert str(got) == str(exc)  # not wrapped a second time
    assert getattr(got, "peers", None) == getattr(exc, "peers", None)


def test_an_evicted_peer_is_a_lost_one_to_code_that_only_knows_peer_lost() -> None:
    got = error_from(reply_for(Evicted("pme")))
    assert isinstance(got, PeerLost) and got.peers == ("pme",)


def test_an_unknown_kind_stays_a_remote_error() -> None:
    got = error_from(p.CtlError(1, "Frobnicated", "no such thing", ()))
    assert isinstance(got, RemoteError) and got.kind == "Frobnicated"
