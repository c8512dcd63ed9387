from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives import messages as m
from peerd.errors import ProtocolError
from peerd.wire import decode_untrusted, encode, registered_types

SAMPLES = [
    m.Heartbeat("r", 3, ("a", "b")),
    m.Heartbeat("r", 3, (), 2**63 - 1),
    m.Heartbeat("r", 3, ("a", "b"), 1, ("b",)),
    m.Ack("r", 0),
    m.Ack("r", 5, False, 77),
    m.JoinRequest("r"),
    m.JoinRequest("r", incarnation=1),
    m.JoinRequest("r", incarnation=1, reaches=("a", "b")),
    m.ViewCommit("r", 9, ("b", "a", "c")),
    m.ViewCommit("r", 9, ("b", "a"), (7, 0)),
    m.ViewReady("r", 2, ("a", "b"), ("c",), True, (m.LinkReport("b", 1e6, 0.01),)),
    m.ViewReady("r", 2, ("a", "b"), (), True, (), ("x", "y")),
    m.ViewReady("r", 2, ("a", "b"), (), True, (), (), (1, 2)),
    m.ViewRefused("r", m.RefuseReason.NOT_MEMBER, "gone"),
    m.Abort("r", 1, ("c",), "deadline"),
    m.Abort("r", 1, ("c", "d"), "silent", ("c",)),
    m.Leave("r", 4),
    m.Probe("r", b"k", 10),
    m.ViewPrepare("r", 3, m.BallotId(2, "b")),
    m.ViewAccept("r", 3, m.BallotId(0, "a"), ("a", "c")),
    m.ViewAccept("r", 3, m.BallotId(0, "a"), ("a", "c"), (5, 2**63 - 1)),
    m.ViewVote("r", True, m.BallotId(2, "b")),
    m.ViewVote("r", False, m.BallotId(5, "c"), m.BallotId(0, "a"), ("a", "b")),
    m.ViewVote("r", True, None),
    m.ViewVote("r", True, None, m.BallotId(0, "a"), ("a", "b"), (3, 4)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_roundtrip(msg: object) -> None:
    assert decode_untrusted(encode(msg)) == msg


def test_type_ids_in_our_range() -> None:
    ours = {i for i, cls in registered_types().items() if cls.__module__ == m.__name__}
    assert len(ours) == 14 and all(200 <= i < 300 for i in ours)


@pytest.mark.parametrize(
    "make",
    [
        lambda: m.ViewCommit("r", -1, ("a",)),
        lambda: m.ViewCommit("r", 1, ("a", "a")),
        lambda: m.ViewCommit("", 1, ("a",)),
        lambda: m.Heartbeat("r", 0, ("",)),
        lambda: m.LinkReport("a", float("nan"), 0.0),
        lambda: m.LinkReport("a", 1.0, -1.0),
        lambda: m.Probe("r", b"", 3),
        lambda: m.Probe("r", b"k", 10**9),
        lambda: m.Heartbeat("r", 0, (), -1),
        lambda: m.Ack("r", 0, True, 2**63),
        lambda: m.JoinRequest("r", incarnation=-5),
        lambda: m.Heartbeat("r", 0, ("a",), 0, ("b",)),  # observed but not a suspect
        lambda: m.Abort("r", 0, ("a",), "x", ("a", "a")),
        lambda: m.JoinRequest("r", reaches=("a", "a")),
        lambda: m.JoinRequest("r", reaches=tuple(f"p{i}" for i in range(m.MAX_MEMBERS + 1))),
        lambda: m.ViewReady("r", 0, ("a",), (), True, (), ("",)),
        lambda: m.BallotId(-1, "a"),
        lambda: m.BallotId(1, ""),
        lambda: m.ViewAccept("r", 0, m.BallotId(1, "a"), ()),  # a view needs members
        lambda: m.ViewAccept("r", 0, m.BallotId(1, "a"), ("a", "a")),
        lambda: m.ViewVote("r", True, None, m.BallotId(1, "a")),  # accepted, but no members
        lambda: m.ViewVote("r", True, None, None, ("a",)),  # members without their ballot
        # a view's incarnations: one per member (or none), each in range
        lambda: m.ViewCommit("r", 1, ("a", "b"), (1,)),
        lambda: m.ViewCommit("r", 1, ("a",), (2**63,)),
        lambda: m.ViewReady("r", 0, ("a",), (), True, (), (), (-1,)),
        lambda: m.ViewAccept("r", 0, m.BallotId(1, "a"), ("a",), (1, 2)),
        lambda: m.ViewVote("r", True, None, m.BallotId(1, "a"), ("a",), (1, 1)),
    ],
)
def test_invalid_values_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


def test_invalid_values_from_the_wire_are_protocol_errors() -> None:
    body = bytearray(encode(m.ViewCommit("r", 1, ("a", "b"))))
    body[body.rindex(b"b")] = ord("a")  # duplicate member id
    with pytest.raises(ProtocolError):
        decode_untrusted(bytes(body))


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_garbage_raises_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_untrusted(data)
