"""Control messages of the collectives engine (wire type ids 200-299).

They travel as payloads of ``Fabric.call``; every one is validated on decode
(``peerd.wire.decode_untrusted`` turns a failed ``__post_init__`` into a
``ProtocolError``), so sizes and values from peers are bounded.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from collectives.incarnation import MAX_INCARNATION
from peerd.wire import message

# 2: views carry their members' incarnations (``ViewCommit``, ``ViewReady``,
# ``ViewAccept``, ``ViewVote``), so peers of version 1 cannot decode them.
PROTOCOL_VERSION = 2
MAX_MEMBERS = 4096
MAX_ID = 256
MAX_BALLOT = 2**62  # ballot numbers stay below (a peer's refusal can name any up to it)


def _check_ids(ids: tuple[str, ...], what: str) -> None:
    if len(ids) > MAX_MEMBERS:
        raise ValueError(f"{what}: more than {MAX_MEMBERS} peers")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: duplicate peer ids")
    for p in ids:
        if not 0 < len(p) <= MAX_ID:
            raise ValueError(f"{what}: bad peer id length")


def _check_observed(observed: tuple[str, ...], named: tuple[str, ...]) -> None:
    _check_ids(observed, "observed")
    if not set(observed) <= set(named):
        raise ValueError("observed peers must be among those named gone")


def _check_run(run: str, revision: int = 0) -> None:
    if not 0 < len(run) <= MAX_ID:
        raise ValueError("bad run name length")
    if revision < 0:
        raise ValueError("negative revision")


def _check_incarnation(incarnation: int) -> None:
    if not 0 <= incarnation <= MAX_INCARNATION:
        raise ValueError("incarnation out of range")


def _check_incarnations(incarnations: tuple[int, ...], members: tuple[str, ...]) -> None:
    """A view's incarnations: one per member, or none at all (not known)."""
    if incarnations and len(incarnations) != len(members):
        raise ValueError("a view's incarnations must match its members one to one")
    for incarnation in incarnations:
        _check_incarnation(incarnation)


@message(200)
@dataclass(frozen=True)
class Heartbeat:
    """'I am alive', plus whom the sender believes gone in its current view
    (``observed``: those of them it found gone itself, not told by others)."""

    run: str
    revision: int
    suspects: tuple[str, ...]
    incarnation: int = 0  # the sender's process (collectives/incarnation.py); 0: not sent
    observed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)
        _check_ids(self.suspects, "suspects")
        _check_incarnation(self.incarnation)
        _check_observed(self.observed, self.suspects)


@message(201)
@dataclass(frozen=True)
class Ack:
    run: str
    revision: int
    # False from a process that holds no view with itself in it: a restarted
    # member (same identity, new process) or a joiner not yet admitted.
    member: bool = True
    incarnation: int = 0
    # False when the responder's view leaves the caller out: at the caller's
    # own revision, two views of one revision (``Membership.reported``).
    knows_you: bool = True

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)
        _check_incarnation(self.incarnation)


@message(202)
@dataclass(frozen=True)
class JoinRequest:
    """Sent by a joiner to every connected peer, repeatedly until admitted."""

    run: str
    version: int = PROTOCOL_VERSION
    incarnation: int = 0
    # The peers the joiner holds sessions with, less those that did not
    # answer its last request: the peers it reaches.
    reaches: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_run(self.run)
        _check_incarnation(self.incarnation)
        _check_ids(self.reaches, "reaches")


@message(203)
@dataclass(frozen=True)
class ViewCommit:
    """A decided view: the reply to a ``ViewReady``/``JoinRequest``, or pushed to joiners."""

    run: str
    revision: int
    members: tuple[str, ...]
    incarnations: tuple[int, ...] = ()  # of the members (``collectives.view.Decision``)

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)
        _check_ids(self.members, "members")
        _check_incarnations(self.incarnations, self.members)


@message(204)
@dataclass(frozen=True)
class LinkReport:
    """The sender's measurement of its link to ``peer``."""

    peer: str
    bandwidth: float  # bytes per second
    latency: float  # seconds, one way

    def __post_init__(self) -> None:
        if not 0 < len(self.peer) <= MAX_ID:
            raise ValueError("bad peer id length")
        for v in (self.bandwidth, self.latency):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError("link figures must be finite and >= 0")


@message(205)
@dataclass(frozen=True)
class ViewReady:
    """A member is at a round boundary and asks the coordinator for the next view."""

    run: str
    revision: int
    members: tuple[str, ...]  # the sender's current view
    suspects: tuple[str, ...]
    admit: bool  # may joiners be admitted (explicit boundary) or not (failure retry)
    links: tuple[LinkReport, ...]
    joiners: tuple[str, ...] = ()  # joiners whose requests reached the sender lately
    incarnations: tuple[int, ...] = ()  # of the sender's view's members

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)
        _check_ids(self.members, "members")
        _check_incarnations(self.incarnations, self.members)
        _check_ids(self.suspects, "suspects")
        _check_ids(self.joiners, "joiners")
        if len(self.links) > MAX_MEMBERS:
            raise ValueError("too many link reports")


class RefuseReason(enum.IntEnum):
    NOT_MEMBER = 1  # the asker is not in the decided view: it was evicted
    RETRY = 2  # the receiver cannot decide now (not coordinator, no view yet)
    VERSION = 3  # the joiner speaks another collectives protocol (``PROTOCOL_VERSION``)


@message(206)
@dataclass(frozen=True)
class ViewRefused:
    run: str
    reason: RefuseReason
    detail: str

    def __post_init__(self) -> None:
        _check_run(self.run)
        if len(self.detail) > 1024:
            raise ValueError("detail too long")


@message(207)
@dataclass(frozen=True)
class Abort:
    """Collectives of ``revision`` that involve ``lost`` must stop: they are gone
    (``observed``: those the sender found gone itself, not told by others)."""

    run: str
    revision: int
    lost: tuple[str, ...]
    reason: str
    observed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)
        _check_ids(self.lost, "lost")
        _check_observed(self.observed, self.lost)
        if len(self.reason) > 1024:
            raise ValueError("reason too long")


@message(208)
@dataclass(frozen=True)
class Leave:
    run: str
    revision: int

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)


@message(209)
@dataclass(frozen=True)
class Probe:
    """Receive ``nbytes`` sent under ``key`` as data, then reply (bandwidth probe)."""

    run: str
    key: bytes
    nbytes: int

    def __post_init__(self) -> None:
        _check_run(self.run)
        if not 0 < len(self.key) <= 512:
            raise ValueError("bad probe key")
        if not 0 < self.nbytes <= 64 * 1024 * 1024:
            raise ValueError("bad probe size")


@message(210)
@dataclass(frozen=True)
class BallotId:
    """A ballot in choosing a view (``collectives.ballot.Ballot``)."""

    number: int
    coordinator: str

    def __post_init__(self) -> None:
        if not 0 <= self.number < MAX_BALLOT:
            raise ValueError("ballot number out of range")
        if not 0 < len(self.coordinator) <= MAX_ID:
            raise ValueError("bad coordinator id length")


@message(211)
@dataclass(frozen=True)
class ViewPrepare:
    """Phase one of choosing the view after ``revision``: promise ``ballot``."""

    run: str
    revision: int
    ballot: BallotId

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)


@message(212)
@dataclass(frozen=True)
class ViewAccept:
    """Phase two: accept ``members`` (in ring order) as the view after
    ``revision`` under ``ballot``."""

    run: str
    revision: int
    ballot: BallotId
    members: tuple[str, ...]
    incarnations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_run(self.run, self.revision)
        _check_ids(self.members, "members")
        if not self.members:
            raise ValueError("a view needs members")
        _check_incarnations(self.incarnations, self.members)


@message(213)
@dataclass(frozen=True)
class ViewVote:
    """An acceptor's answer to a ``ViewPrepare`` or ``ViewAccept``: ``ok``, the
    highest ballot it promised, and the members it accepted last (under
    ``accepted``; empty with ``accepted`` None)."""

    run: str
    ok: bool
    promised: BallotId | None
    accepted: BallotId | None = None
    accepted_members: tuple[str, ...] = ()
    accepted_incarnations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_run(self.run)
        _check_ids(self.accepted_members, "accepted members")
        if (self.accepted is None) != (not self.accepted_members):
            raise ValueError("accepted members come with their ballot, and only with it")
        _check_incarnations(self.accepted_incarnations, self.accepted_members)
