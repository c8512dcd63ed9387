"""Membership driver of one run over a ``Fabric`` (trio).

The driver registers the run's control
handlers, detects failures (``collectives.liveness``: heartbeats, restarts,
broken links; here: a peer's abort), measures links (RTT from heartbeats,
bandwidth from a one-off data probe) and agrees round views with the other
members (``collectives.view``).
Collectives themselves live in ``collectives.run``; this module owns who is in
the run and who is gone.

Rounds: members call ``update_view()`` together at a round boundary (joins
take effect there); ``all_reduce(retry=True)`` re-forms the view among the
survivors after a failure, without admitting joiners.

Partitions: a peer whose reachable members are no quorum of its view raises
``PeerLost`` and keeps heartbeating the members it lost. When one answers
with a newer revision, the other side went on without it: the peer is
*stranded* (``current_view()`` is ``None``, collectives raise ``Evicted``)
and its next round boundary (``update_view``, ``StateSync.sync``) rejoins
the run as a joiner, like a dynamic join. A member that answers with this
peer's revision but a view without this peer strands it too (a defence:
views are chosen by ballot, ``collectives.ballot``, so two views of one
revision should not exist).

View changes: the coordinator collects the members' readies, proposes the
next view, and installs it once a quorum of the current members accepted it
(``_propose``); the readies are answered with it and the members whose ready
went elsewhere are sent it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from collectives import messages as m
from collectives.api import View
from collectives.ballot import Acceptor, Ballot, Vote, adopt, settled
from collectives.fabric import Fabric
from collectives.history import FIRST_MEMBERS, NO_HISTORY
from collectives.incarnation import Incarnations, new_incarnation
from collectives.liveness import Liveness
from collectives.membership import Membership, NotMember, Pending, Retry, Timing
from collectives.topology import LinkEstimate
from collectives.view import Decision, Ready, has_quorum, initial_view
from peerd.datachan import threads_pay
from peerd.errors import (
    ConfigError,
    Evicted,
    PeerLost,
    ProtocolError,
    RemoteError,
    Timeout,
)
from peerd.log import event
from peerd.wire import decode_untrusted, encode

log = logging.getLogger("collectives.driver")

PHASE_TIMEOUT = 30.0  # base deadline of one all-reduce phase, plus size / MIN_BANDWIDTH
MIN_BANDWIDTH = 1.25e6  # bytes/s (10 Mbit/s): the slowest link a phase deadline allows for
CALL_TIMEOUT = 10.0  # control RPCs other than view agreement
PROBE_BYTES = 1 << 20  # bandwidth probe size per peer pair
# Automatic sub-chunks: a ring chunk in AUTO_SUB_SPLIT blocks, but each at
# least AUTO_SUB_MIN (below, per-message costs dominate) and at most
# AUTO_SUB_MAX (beyond, the pipeline takes longer to fill and nothing is
# gained). Measured on loopback, 4 peers: 10M fp32, CPU per all-reduce with
# 1 MiB blocks 0.21 s, 2.5-4 MiB 0.13 s, 16 MiB 0.15 s; with the native record
# loops on 2 cores, 10 MB chunks in 2 blocks instead of 4 took 11-14% less
# time (median of 10-24 rounds, three runs), 100M with 8 MiB blocks instead
# of 4 the same; on a 16-core host one 10 MB block per chunk was no slower.
# Where everything runs on the event loop (no worker threads: few cores, so
# reducing and moving bytes cannot overlap anyway) a chunk goes whole, up to
# AUTO_SUB_MAX_LOOP: per-block costs are all that the split buys there
# (session 18, 2 cores, 10M into out=, six alternating pairs of 30 rounds:
# one 10 MB block per chunk took 1-10% less time and 4-10% less CPU than two;
# 100M with 16 MiB blocks 0.45-0.48 s against 0.47-0.49 with 8 MiB; across
# namespaces at 200 Mbit/s both 0.95 of the link).
AUTO_SUB_SPLIT = 2
AUTO_SUB_MIN = 1 << 20
AUTO_SUB_MAX = 8 << 20
AUTO_SUB_MAX_LOOP = 16 << 20


class EngineStopped(ConfigError):
    """The engine ended while a call waited on it (``Node.join_run`` starts afresh)."""


def check_phase_timeout(seconds: float) -> float:
    """``seconds`` if it can be a phase timeout; ``ConfigError`` saying what to pass."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"phase_timeout must be a positive number of seconds, not {seconds!r}: "
                          "how long a member waits in a collective for the others (the "
                          f"default is {PHASE_TIMEOUT:g} s, plus the tensor's size at 10 Mbit/s)")
    return float(seconds)


@dataclass(frozen=True)
class EngineConfig:
    timing: Timing = field(default_factory=Timing)
    phase_timeout: float = PHASE_TIMEOUT
    min_bandwidth: float = MIN_BANDWIDTH
    # Pipelining unit in fp32 bytes of a sub-chunk; 0 picks one per tensor
    # (see ``sub_chunk_elems``).
    sub_chunk_bytes: int = 0
    call_timeout: float = CALL_TIMEOUT
    probe_bytes: int = PROBE_BYTES
    max_attempts: int = 8
    join_timeout: float = 300.0
    # Reduce large blocks and copy results on worker threads, as the data
    # channels do their I/O (``peerd.datachan.DataConfig``); None: where this
    # process may use enough cores for it to pay.
    worker_threads: bool | None = None

    def use_threads(self) -> bool:
        return threads_pay(self.worker_threads)


def phase_config(seconds: float) -> EngineConfig:
    """The engine config of a run whose members wait ``seconds`` for one another
    (``ConfigError`` saying what to pass where it cannot be one): in every
    collective (plus the tensor's size at the minimum bandwidth), and at round
    boundaries, where the coordinator waits that long for every member's ready.
    A member stuck before ``sync_state`` (Streaming DiLoCo's overlapped rounds
    wait there, not in a collective) is then dropped as soon as one stuck
    before an all-reduce, and a run that lets slow members take longer lets
    them take longer at its boundaries too."""
    seconds = check_phase_timeout(seconds)
    return EngineConfig(phase_timeout=seconds, timing=Timing(view_timeout=seconds))


@dataclass(frozen=True)
class EngineStats:
    revision: int | None
    members: tuple[str, ...]
    suspects: tuple[str, ...]
    view_changes: int
    peers_lost: int
    all_reduces: int
    failed_attempts: int
    bytes_sent: int
    bytes_received: int
    stranded: bool = False  # on the side of a partition that lost; rejoins at a boundary
    ballots: int = 0  # proposals of a next view this peer made as coordinator
    ballots_failed: int = 0  # of them, those outvoted or short of a quorum


def sub_chunk_elems(config: EngineConfig, n: int, peers: int) -> int:
    """Elements per sub-chunk for a tensor of ``n`` elements over ``peers``."""
    if config.sub_chunk_bytes > 0:
        return max(1, config.sub_chunk_bytes // 4)
    chunk_bytes = 4 * -(-n // peers)  # fp32 bytes of the largest ring chunk
    split, most = (AUTO_SUB_SPLIT, AUTO_SUB_MAX) if config.use_threads() else (1, AUTO_SUB_MAX_LOOP)
    return max(AUTO_SUB_MIN, min(most, chunk_bytes // split)) // 4


def view_digest(decision: Decision) -> str:
    """Short hash of a view, so data of two different views can never mix."""
    text = f"{decision.revision}|{'|'.join(decision.members)}".encode()
    return hashlib.sha256(text).hexdigest()[:16]


@dataclass
class _JoinPass:
    """One round of a joiner's requests: how many are still out, and whether
    a peer answered that had not before (then the next round says so)."""

    pending: int
    news: bool = False


class MembershipDriver(Liveness):
    """Membership, failure detection and round views of one run on one node."""

    def __init__(self, fabric: Fabric, run: str, config: EngineConfig | None = None) -> None:
        self.fabric = fabric
        self.run = run
        self.me = fabric.me
        self.config = config or EngineConfig()
        self.incarnation = new_incarnation()
        self.core = Membership(self.me, self.config.timing, self.incarnation)
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()  # replaced whenever the view or the suspects change
        self._reform_lock = trio.Lock()
        self._proposing = False  # a ballot of this peer is under way (one at a time)
        self._retries = 0  # ballots retried in a row since the view last changed
        self._waiting: set[str] = set()  # members whose readies wait here for the next view
        # For ``collectives.history``: a peer that joins has no history to compare.
        self.joins = 0
        self.history_base = FIRST_MEMBERS
        self.stopped = False  # the engine ended (left, or its node closed)
        self._rtt: dict[str, float] = {}
        self._bandwidth: dict[str, float] = {}
        self._probing: set[str] = set()
        # When each peer last answered a heartbeat or join request of this
        # peer: what a joiner may claim to reach (a session can outlive its link).
        self._answers: dict[str, float] = {}
        self._seen_connected: set[str] = set()
        self._on_lost: list[Callable[[frozenset[str], str], None]] = []
        self._member_scopes: set[trio.CancelScope] = set()  # see ``_while_member``
        self._probe_seq = 0
        self._refusal = ""  # why a member refused this peer's join outright (a version)
        self._incarnations = Incarnations()
        self.view_changes = 0
        self.peers_lost = 0
        self.counters: dict[str, int] = {"all_reduces": 0, "failed": 0, "sent": 0, "received": 0,
                                         "ballots": 0, "ballots_failed": 0}

    # ------------------------------------------------------------------ public

    def current_view(self) -> View | None:
        """The installed view if this peer is a member of it, else ``None``."""
        d = self.core.view
        if d is None or not self.core.is_member:
            return None
        return View(self.run, d.revision, d.members, self.me)

    def view(self) -> View:
        v = self.current_view()
        if v is None:
            raise self.evicted() if self.core.view else ConfigError("join the run first")
        return v

    def evicted(self, detail: str = "") -> Evicted:
        d = self.core.view
        if self.core.stranded:
            assert d is not None
            detail = (f"the run went on without this peer after revision {d.revision} "
                      "(a partition or flap left this side without quorum); it rejoins at "
                      "the next round boundary")
        elif not detail and d is not None and self.me not in d.members:
            detail = (f"the run went on without this peer: revision {d.revision} leaves it "
                      "out; it rejoins at the next round boundary")
        return Evicted(self.me, detail)

    def statistics(self) -> EngineStats:
        d = self.core.view
        c = self.counters
        return EngineStats(
            d.revision if d else None,
            d.members if d else (),
            tuple(sorted(self.core.suspects)),
            self.view_changes,
            self.peers_lost,
            c["all_reduces"],
            c["failed"],
            c["sent"],
            c["received"],
            self.core.stranded,
            c["ballots"],
            c["ballots_failed"],
        )

    def link_bandwidth(self, peer: str) -> float:
        """Measured data throughput to ``peer`` in bytes/s (0 if not probed)."""
        return self._bandwidth.get(peer, 0.0)

    async def update_view(self) -> View:
        """Round boundary: agree the next view with every member (joiners
        admitted). A peer the run went on without (stranded, or left out of
        the view it installed) instead waits here to be admitted again, as
        its ``Evicted`` said it would be."""
        if not self._left_out():
            try:
                await self._change_view(admit=True, after=None)
                return self.view()
            except Evicted:
                if not self._left_out():
                    raise
                # Left out of the view agreed here, as the coordinator said.
        return await self.join()

    def _left_out(self) -> bool:
        """A member of the run whose view no longer counts it (stranded, or not in it)."""
        return self.core.view is not None and self.current_view() is None

    async def join(self, timeout: float | None = None) -> View:
        """Ask the run's members to admit this peer; returns once a view includes it."""
        # Whatever this peer completed before is not the run's history since:
        # it was away (or never here) while the others went on.
        self.joins += 1
        self.history_base = NO_HISTORY
        limit = timeout if timeout is not None else self.config.join_timeout
        try:
            await self._join(limit)
        except trio.TooSlowError:
            asked = len(self.fabric.peers())
            whom = (f"none of the {asked} connected peer(s) admitted it" if asked else
                    "no peer is connected to this node")
            if self._refusal:
                whom += f" (refused by {self._refusal})"
            raise Timeout(
                f"not admitted to run {self.run!r} within {limit:g} s: {whom}. To join a "
                "running run, connect to one of its members first; a new run starts when "
                "its founders join with members=[...], each passing the same list of peer "
                "ids, its own among them") from None
        return self.view()

    async def _join(self, limit: float) -> None:
        with trio.fail_after(limit):
            while self.current_view() is None:
                if self.stopped:  # it can send no more requests: nothing can admit it
                    raise EngineStopped(f"run {self.run!r} was left on this node while a "
                                        "join of it waited for admission")
                changed = self._changed
                peers = self.fabric.peers()
                # Only peers that answered lately count as reached: a session
                # can outlive its link (a silent cut is found at the idle
                # timeout), and a joiner admitted on such a claim breaks the
                # next ring. A stranded member's probes were answered; a new
                # joiner's first pass claims nothing, and a pass whose requests
                # all ended with new answers starts the next at once
                # (``_send_join``), so its claim lags one round trip.
                reaches = sorted(self._reached(peers))[:m.MAX_MEMBERS]
                request = encode(m.JoinRequest(self.run, incarnation=self.incarnation,
                                               reaches=tuple(reaches)))
                joint = _JoinPass(len(peers))
                for peer in sorted(peers):
                    self._spawn(self._send_join, peer, request, joint)
                with trio.move_on_after(self.config.timing.heartbeat_interval):
                    await changed.wait()

    async def leave(self) -> None:
        """Tell the members this peer leaves; they drop it at once."""
        d = self.core.view
        if d is None or not self.core.is_member:
            return
        msg = encode(m.Leave(self.run, d.revision))
        async with trio.open_nursery() as nursery:
            for peer in self.core.others():
                nursery.start_soon(self._quiet_call, peer, "leave", msg)
        # A view without incarnations zips to none, as the one after it has.
        self._install(Decision(
            d.revision + 1, tuple(p for p in d.members if p != self.me),
            tuple(i for p, i in zip(d.members, d.incarnations, strict=False) if p != self.me)))

    async def step_out(self, why: PeerLost) -> Evicted:
        """This peer's history is out of line with the others' (``collectives.history``):
        leave (the others drop it at once) and return the ``Evicted`` to raise, so
        that the caller's ``join()`` readmits it with a fresh history."""
        await self.leave()
        return Evicted(self.me, str(why))

    # ------------------------------------------------------------ for the ops

    def on_lost(self, callback: Callable[[frozenset[str], str], None]) -> None:
        """Call ``callback(peers, why)`` whenever peers are found or reported gone."""
        self._on_lost.append(callback)

    def changed(self) -> trio.Event:
        return self._changed

    @contextlib.contextmanager
    def _while_member(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that this peer's stranding cancels: the view that
        what runs in it works on is dead, and its deadlines (minutes for a
        large tensor) would only stall the caller, who gets ``Evicted``."""
        with trio.CancelScope() as scope:
            if self.core.stranded:
                scope.cancel()
            self._member_scopes.add(scope)
            try:
                yield scope
            finally:
                self._member_scopes.discard(scope)

    def lost(self, peers: set[str] | frozenset[str], reason: str, reported: bool = False,
             found: set[str] | frozenset[str] = frozenset()) -> frozenset[str]:
        """Record peers as gone (this peer found them so, or another member
        ``reported`` it; ``found`` are more that this peer found itself):
        abort collectives using them, tell the other members, in one message."""
        new = (self.core.suspect(set(peers) - set(found), observed=not reported)
               | self.core.suspect(found, observed=True))
        for peer in new:
            # Sends to it that the abort cancels must not wait on bytes it may
            # never read (a stopped peer): that held the retry 10 s.
            self.fabric.abandon(peer)
        d = self.core.view
        # Reported but not taken up (this peer would lose its quorum): still,
        # the reporter cannot reach them, so a collective that needs them all
        # cannot finish. It ends now, not at its phase deadline (30 s and
        # more), which outlasted a client's call.
        refused = (set(peers) & set(d.members if d else ())) - self.core.suspects - {self.me}
        if new or refused:
            for callback in list(self._on_lost):
                callback(new | refused, reason)
        if not new:
            return new
        self.peers_lost += len(new)
        event(log, "collectives.peer_lost", me=self.me, run=self.run, peers=sorted(new), why=reason)
        assert d is not None
        msg = encode(m.Abort(self.run, d.revision, tuple(sorted(new)), reason[:1000],
                             tuple(sorted(new & self.core.observed))))
        for peer in self.core.others():
            if peer not in self.core.suspects:
                self._spawn(self._quiet_call, peer, "abort", msg)
        self._poll_round()
        self._notify()
        return new

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._spawn(fn, *args)

    async def reform(self, after: int) -> None:
        """Form a view among survivors after revision ``after`` failed (no joiners)."""
        await self._change_view(admit=False, after=after)

    # ------------------------------------------------------------ lifecycle

    def _method(self, name: str) -> str:
        return f"collectives/{self.run}/{name}"

    def _start(self, nursery: trio.Nursery, members: tuple[str, ...] | None) -> None:
        self._nursery = nursery
        if members is None:
            self.history_base = NO_HISTORY  # a joiner: nothing to compare yet
        else:
            if self.me not in members:
                raise ConfigError(f"initial members of run {self.run!r} must include this peer")
            self._install(initial_view(members))
        handlers = {
            "hb": self._on_heartbeat,
            "join": self._on_join,
            "ready": self._on_ready,
            "commit": self._on_commit,
            "prepare": self._on_prepare,
            "accept": self._on_accept,
            "abort": self._on_abort,
            "leave": self._on_leave,
            "probe": self._on_probe,
        }
        for name, handler in handlers.items():
            self.fabric.register(self._method(name), handler)
        nursery.start_soon(self._heartbeat_loop)

    def _stop(self) -> None:
        self._nursery = None  # background work ends with the engine
        self.stopped = True
        self._notify()  # a join waiting for admission ends (``_join``)
        for name in ("hb", "join", "ready", "commit", "prepare", "accept", "abort", "leave",
                     "probe"):
            self.fabric.unregister(self._method(name))

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _notify(self) -> None:
        if self.core.stranded:
            for scope in self._member_scopes:
                scope.cancel()
        self._changed.set()
        self._changed = trio.Event()

    def _install(self, decision: Decision) -> None:
        before = self.core.view
        self.core.install(decision, trio.current_time())
        self._sync(before)

    def _sync(self, before: Decision | None) -> None:
        """React to a view change made by the core."""
        now_view = self.core.view
        if now_view is before or now_view is None:
            return
        # What this peer heard of a member's process holds only if it was in
        # the view before this one: one that skipped a view may have missed a
        # member's restart and its new process's admission.
        follows = (before is not None and self.me in before.members
                   and now_view.revision == before.revision + 1)
        self._incarnations.adopt(now_view, fresh=not follows)
        self.view_changes += 1
        self._retries = 0
        event(
            log,
            "collectives.view",
            me=self.me,
            run=self.run,
            revision=now_view.revision,
            members=now_view.members,
        )
        self._notify()

    async def _quiet_call(self, peer: str, name: str, payload: bytes) -> None:
        with contextlib.suppress(PeerLost, Timeout, RemoteError):
            await self.fabric.call(peer, self._method(name), payload, self.config.call_timeout)

    def _commit(self, decision: Decision) -> bytes:
        return encode(m.ViewCommit(self.run, decision.revision, decision.members,
                                   decision.incarnations))

    def _decode(self, payload: bytes, cls: type[Any]) -> Any:
        msg = decode_untrusted(payload, expect=cls)
        if msg.run != self.run:
            raise ProtocolError(f"message for run {msg.run!r} on run {self.run!r}")
        return msg

    def _ack(self, peer: str) -> bytes:
        """The answer to ``peer``: our revision, whether we hold a view with
        ourselves in it, and whether that view has ``peer`` in it too (a
        stranded peer's view is dead and claims nothing about anyone)."""
        d = self.core.view
        member = d is not None and self.me in d.members
        knows = d is None or not self.core.is_member or peer in d.members
        return encode(m.Ack(self.run, d.revision if d else 0, member, self.incarnation, knows))

    async def _on_abort(self, peer: str, payload: bytes) -> bytes:
        msg: m.Abort = self._decode(payload, m.Abort)
        if self.core.speaks_for_view(peer, msg.revision):
            # If it found this peer gone itself, it cannot talk to this peer:
            # treat it alike. Only its own finding counts: a loss it passes on
            # from a third member says nothing about the link between the two
            # of them, and taking it so spread one cut link between two members
            # until no side had a quorum.
            found = {peer} if self.me in msg.observed else set()
            why = f"{peer} cannot reach this peer; " if found else ""
            self.lost(set(msg.lost) - {self.me}, f"{why}{peer}: {msg.reason}", reported=True,
                      found=found)
        return self._ack(peer)

    async def _on_leave(self, peer: str, payload: bytes) -> bytes:
        self._decode(payload, m.Leave)
        self.lost({peer}, "left the run")
        return self._ack(peer)

    # ------------------------------------------------------------ joining

    async def _send_join(self, peer: str, request: bytes, joint: _JoinPass) -> None:
        try:
            reply = await self.fabric.call(
                peer, self._method("join"), request, self.config.timing.heartbeat_interval * 2)
        except (PeerLost, Timeout, RemoteError):
            self._answers.pop(peer, None)
        else:
            joint.news |= peer not in self._reached({peer})
            self._answers[peer] = trio.current_time()
            msg = decode_untrusted(reply)
            if isinstance(msg, m.ViewCommit) and msg.run == self.run and self.me in msg.members:
                self._install(_decision_of(msg))
            elif isinstance(msg, m.ViewRefused) and msg.reason == m.RefuseReason.VERSION:
                self._refusal = f"{peer}: {msg.detail}"
        finally:
            joint.pending -= 1
            if not joint.pending and joint.news:
                self._notify()  # the next request says this joiner reaches them

    def _reached(self, peers: set[str]) -> set[str]:
        """Those of ``peers`` that answered a call within the heartbeat timeout."""
        since = trio.current_time() - self.config.timing.heartbeat_timeout
        return {p for p in peers if self._answers.get(p, -math.inf) >= since}

    async def _on_join(self, peer: str, payload: bytes) -> bytes:
        msg: m.JoinRequest = self._decode(payload, m.JoinRequest)
        d = self.core.view
        if msg.version != m.PROTOCOL_VERSION:
            return encode(m.ViewRefused(
                self.run, m.RefuseReason.VERSION,
                f"the run's members speak collectives protocol {m.PROTOCOL_VERSION}, this "
                f"joiner {msg.version}: run the same peerd version as they do"))
        if d is None or not self.core.is_member:
            return encode(m.ViewRefused(self.run, m.RefuseReason.RETRY, "not a member"))
        if self._restarted(peer, msg.incarnation) or peer in self.core.suspects:
            # Its earlier process is a member of this view; the new one cannot
            # take over that process's part of a round. It is admitted once the
            # view has dropped the old one.
            return encode(m.ViewRefused(self.run, m.RefuseReason.RETRY,
                                        "an earlier process of this peer is being dropped"))
        self.core.join_request(peer, trio.current_time(), frozenset(msg.reaches), msg.incarnation)
        return self._commit(d)

    async def _on_commit(self, peer: str, payload: bytes) -> bytes:
        msg: m.ViewCommit = self._decode(payload, m.ViewCommit)
        if self.me in msg.members:
            self._install(_decision_of(msg))
        return self._ack(peer)

    # ------------------------------------------------------------ view agreement

    def _ready(self, admit: bool) -> m.ViewReady:
        d = self.core.view
        assert d is not None
        links = tuple(
            m.LinkReport(p, self._bandwidth[p], self._rtt.get(p, 0.0) / 2)
            for p in self.core.others()
            if p in self._bandwidth
        )
        # Bounded like every id list on the wire; more joiners wait a boundary.
        joiners = sorted(self.core.joiners(trio.current_time()))[:m.MAX_MEMBERS] if admit else []
        return m.ViewReady(
            self.run, d.revision, d.members, tuple(sorted(self.core.suspects)), admit, links,
            tuple(joiners), d.incarnations,
        )

    def _poll_round(self) -> None:
        """As coordinator, propose the next view once it can be decided."""
        if self._proposing or self._nursery is None or self.core.coordinator() != self.me:
            return
        candidate = self.core.proposal(trio.current_time())
        if candidate is not None:
            self._proposing = True
            self._nursery.start_soon(self._propose, self._stamped(candidate))

    def _stamped(self, candidate: Decision) -> Decision:
        """``candidate`` with the process of each member that this peer knows:
        its own, the latest it heard from each member of the view it installed,
        and for a joiner the process that asked (a joiner is admitted only on
        requests that reached the coordinator, ``decide_view``)."""
        d = self.core.view
        current = set(d.members) if d else set()
        return dataclasses.replace(candidate, incarnations=tuple(
            self.incarnation if p == self.me
            else self._incarnations.of(p) if p in current
            else self.core.joiner_incarnation(p) or self._incarnations.of(p)
            for p in candidate.members))

    async def _propose(self, candidate: Decision) -> None:
        """Get a view chosen after the current one (``collectives.ballot``) and
        install it; a ballot that fails is retried a heartbeat interval later."""
        base = self.core.view
        assert base is not None
        try:
            chosen = await self._ballot(base, candidate)
        finally:
            self._proposing = False
        if chosen is None or self.core.view is not base:
            self._notify()  # waiting readies look again
            # Retried a few times on its own (a member's next ready starts
            # another): a quorum that does not answer is found gone meanwhile.
            if self.core.view is base and self._retries < self.config.max_attempts:
                self._retries += 1
                self._spawn(self._propose_later, base)
            return
        self._install(chosen)
        # The readies waiting here are answered with it; the other members are
        # told (a joiner sent none, and a member may have given up on this
        # coordinator for another, which may never learn the view).
        msg = self._commit(chosen)
        for peer in chosen.members:
            if peer != self.me and peer not in self._waiting:
                self._spawn(self._quiet_call, peer, "commit", msg)

    async def _propose_later(self, base: Decision) -> None:
        await trio.sleep(self.config.timing.heartbeat_interval)
        if self.core.view is base:
            self._poll_round()

    async def _ballot(self, base: Decision, candidate: Decision) -> Decision | None:
        """One ballot: prepare it where it must be (phase one), then have it
        accepted; the view chosen, or ``None`` without a quorum."""
        if self.core.view is not base:
            return None  # installed meanwhile: nothing left to choose
        ballot = self.core.ballot()
        self.counters["ballots"] += 1
        if ballot.number >= m.MAX_BALLOT:
            # Only a peer's refusal naming a ballot at the very top leads
            # here; no ballot can go above it.
            self.counters["ballots_failed"] += 1
            return None
        wire = _ballot_id(ballot)
        value: Decision | None = candidate
        if ballot.number > 0:
            promises = await self._poll_voters(
                base, "prepare", encode(m.ViewPrepare(self.run, base.revision, wire)),
                lambda a: a.prepare(ballot))
            value = adopt(candidate, promises) if promises is not None else None
        if value is not None:
            proposal = value
            accepts = await self._poll_voters(
                base, "accept",
                encode(m.ViewAccept(self.run, base.revision, wire, proposal.members,
                                    proposal.incarnations)),
                lambda a: a.accept(ballot, proposal))
            value = proposal if accepts is not None else None
        if value is None:
            self.counters["ballots_failed"] += 1
            event(log, "collectives.ballot_failed", me=self.me, run=self.run,
                  revision=base.revision, ballot=ballot.number)
        return value

    async def _poll_voters(self, base: Decision, name: str, payload: bytes,
                           own: Callable[[Acceptor], Vote]) -> list[Vote] | None:
        """This peer's vote and the other members' (not suspected) until a
        quorum of ``base`` voted yes: their votes, or ``None`` once that
        cannot happen or the view moved on meanwhile."""
        votes: dict[str, Vote] = {}
        acceptor = self.core.acceptor(base.revision)
        if self.core.view is not base or not isinstance(acceptor, Acceptor):
            return None  # a view was installed meanwhile
        votes[self.me] = own(acceptor)
        voters = [p for p in base.members if p != self.me and p not in self.core.suspects]

        def yes() -> set[str]:
            return {p for p, v in votes.items() if v.ok}

        async with trio.open_nursery() as nursery:

            async def ask(peer: str) -> None:
                with contextlib.suppress(PeerLost, Timeout, RemoteError, ProtocolError):
                    reply = decode_untrusted(await self.fabric.call(
                        peer, self._method(name), payload, self.config.call_timeout))
                    if isinstance(reply, m.ViewVote) and reply.run == self.run:
                        votes[peer] = _vote_of(reply, base.revision + 1)
                    elif isinstance(reply, m.ViewCommit) and reply.run == self.run:
                        # Chosen already. Installed even where it leaves this
                        # peer out: the readies waiting here then get their
                        # answer, and this peer rejoins (``Evicted``).
                        self._install(_decision_of(reply))
                if self.core.view is not base or settled(base.members, yes()):
                    nursery.cancel_scope.cancel()

            for peer in voters:
                nursery.start_soon(ask, peer)
        for vote in votes.values():
            if not vote.ok:
                self.core.refused(vote)
        if self.core.view is not base or not settled(base.members, yes()):
            return None
        return [v for v in votes.values() if v.ok]

    def _cast(self, peer: str, base: int, ballot: m.BallotId,
              act: Callable[[Acceptor, Ballot], Vote]) -> bytes:
        """This peer's vote on ``peer``'s ballot in choosing the view after ``base``."""
        if ballot.coordinator != peer:
            raise ProtocolError(f"{peer} sent a ballot of {ballot.coordinator}")
        state = self.core.acceptor(base)
        if isinstance(state, Decision):
            return self._commit(state)
        if state is None:
            return encode(m.ViewRefused(self.run, m.RefuseReason.RETRY,
                                        f"no say in the view after revision {base}"))
        vote = act(state, _ballot_of(ballot))
        promised, accepted = vote.promised, vote.accepted
        return encode(m.ViewVote(
            self.run, vote.ok, _ballot_id(promised) if promised else None,
            _ballot_id(accepted[0]) if accepted else None, accepted[1].members if accepted else (),
            accepted[1].incarnations if accepted else ()))

    async def _on_prepare(self, peer: str, payload: bytes) -> bytes:
        msg: m.ViewPrepare = self._decode(payload, m.ViewPrepare)
        return self._cast(peer, msg.revision, msg.ballot, lambda a, b: a.prepare(b))

    async def _on_accept(self, peer: str, payload: bytes) -> bytes:
        msg: m.ViewAccept = self._decode(payload, m.ViewAccept)
        proposal = Decision(msg.revision + 1, msg.members, msg.incarnations)
        return self._cast(peer, msg.revision, msg.ballot, lambda a, b: a.accept(b, proposal))

    async def _offer(self, peer: str, msg: m.ViewReady) -> bytes:
        ready = Ready(
            peer,
            msg.revision,
            msg.members,
            frozenset(msg.suspects),
            msg.admit,
            {r.peer: LinkEstimate(r.bandwidth, r.latency) for r in msg.links},
            frozenset(msg.joiners),
            msg.incarnations,
        )
        if self.core.view is not None and ready.revision == self.core.view.revision:
            # Go through lost(), not just the core, so our own collectives abort too.
            self.lost(set(ready.suspects) - {self.me}, f"reported by {peer}", reported=True)
        before = self.core.view
        outcome = self.core.offer(ready, trio.current_time())
        self._sync(before)
        if isinstance(outcome, Pending):
            self._waiting.add(peer)
            try:
                outcome = await self._await_view(peer, outcome)
            finally:
                self._waiting.discard(peer)
        if isinstance(outcome, Decision):
            return self._commit(outcome)
        reason = (
            m.RefuseReason.NOT_MEMBER if isinstance(outcome, NotMember) else m.RefuseReason.RETRY
        )
        return encode(m.ViewRefused(self.run, reason, outcome.detail))

    async def _await_view(self, peer: str, outcome: Pending) -> Decision | NotMember | Retry:
        """The answer to ``peer``'s ready once a view past ``outcome`` is chosen."""
        self._poll_round()
        deadline = self.core.deadline() or trio.current_time()
        with trio.move_on_at(deadline):
            # Waiting on without a quorum is pointless: nothing can be decided.
            while (self.core.view is not None and self.core.view.revision <= outcome.revision
                   and self._quorate()):
                await self._changed.wait()
        answer = self.core.answer(peer, outcome.revision)
        if answer is None:
            # Past the deadline: propose without the missing members, and see
            # that ballot through.
            self._poll_round()
            with trio.move_on_after(2 * self.config.call_timeout):
                while (self._proposing and self.core.view is not None
                       and self.core.view.revision <= outcome.revision):
                    await self._changed.wait()
            answer = self.core.answer(peer, outcome.revision)
        return answer if answer is not None else Retry("no decision before the deadline")

    async def _on_ready(self, peer: str, payload: bytes) -> bytes:
        return await self._offer(peer, self._decode(payload, m.ViewReady))

    def _quorate(self) -> bool:
        """Whether the members not suspected are a quorum of the installed view."""
        d = self.core.view
        return d is not None and has_quorum(d.members, set(d.members) - self.core.suspects)

    async def _ask(self, coord: str, payload: bytes) -> bytes | None:
        """Send our ready to ``coord`` and wait for the decision; ``None`` as
        soon as ``coord`` is suspected, this side has no quorum left (a
        coordinator across a partition would otherwise hold us for the whole
        view timeout) or a view chosen meanwhile came another way (a
        coordinator whose ballot lost may not learn it)."""
        base = self.core.view
        timeout = self.config.timing.view_timeout + self.config.call_timeout
        reply: list[bytes] = []
        failed: list[Exception] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                try:
                    # A ready may arrive twice (the coordinator keeps one per
                    # peer): a cut-off call must not make a live coordinator
                    # a suspect.
                    reply.append(await self.call_idempotent(coord, "ready", payload, timeout))
                except (PeerLost, Timeout, RemoteError) as exc:
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                while (coord not in self.core.suspects and self._quorate()
                       and self.core.view is base):
                    await self.changed().wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(call)
            nursery.start_soon(watch)
        if failed:
            raise failed[0]
        return reply[0] if reply else None

    async def _left_behind(self) -> bool:
        """Without a quorum, whether the others went on without this peer.

        This side then probes the members it lost every heartbeat interval,
        and one that answers with a newer revision strands it. A peer that was
        stopped (SIGSTOP, a laptop asleep) finds every member silent when it
        resumes, and its first answer comes within an interval or two: waiting
        that long tells its caller to rejoin (``Evicted``) rather than that
        the run lost its quorum (``PeerLost``), which no retry would mend."""
        with trio.move_on_after(3 * self.config.timing.heartbeat_interval):
            while not self.core.stranded:
                await self.changed().wait()
        return self.core.stranded

    async def _change_view(self, *, admit: bool, after: int | None) -> None:
        async with self._reform_lock:
            d = self.core.view
            if d is None or not self.core.is_member:
                raise self.evicted()
            if after is not None and d.revision > after:
                return  # another task already re-formed the view past the failed one
            # Stranded meanwhile (a member's answer shows the run went on
            # without this peer), no view can be agreed here: stop at once
            # rather than after the view timeouts, which took 50 s in tests.
            with self._while_member() as scope:
                await self._agree_next(admit, d)
            if scope.cancelled_caught:
                raise self.evicted()

    async def _agree_next(self, admit: bool, d: Decision) -> None:
        """Agree on the view after ``d`` (admitting joiners if ``admit``): as
        coordinator, or by asking it, until one is installed; ``PeerLost``
        without a quorum or an agreement, ``Evicted`` when left out."""
        start = d.revision
        for _ in range(4 * self.config.max_attempts):
            now_view = self.core.view
            if now_view is not None and now_view.revision > start:
                return  # chosen while this peer asked (see ``_ask``)
            if not self._quorate():
                # This side of a partition cannot form a view; the other may.
                if await self._left_behind():
                    raise self.evicted()
                now_view = self.core.view
                assert now_view is not None
                alive = set(now_view.members) - self.core.suspects
                raise PeerLost(set(now_view.members) - alive,
                               f"no quorum: {len(alive)} of {len(now_view.members)} "
                               f"members of revision {now_view.revision} reachable")
            coord = self.core.coordinator()
            assert coord is not None  # this peer is never its own suspect
            try:
                if coord == self.me:
                    reply: bytes | None = await self._offer(self.me, self._ready(admit))
                else:
                    reply = await self._ask(coord, encode(self._ready(admit)))
            except (PeerLost, Timeout):
                self.lost({coord}, "coordinator unreachable")
                continue
            except RemoteError:
                await trio.sleep(self.config.timing.heartbeat_interval)
                continue
            if reply is None:
                continue  # the coordinator, or the quorum, was lost meanwhile
            msg = decode_untrusted(reply)
            if isinstance(msg, m.ViewCommit) and msg.run == self.run:
                if self.me not in msg.members:
                    # The run went on without this peer: it rejoins (``update_view``).
                    self._answered(coord, msg.revision, excluded=True)
                    raise Evicted(self.me, f"not in revision {msg.revision}")
                self._install(_decision_of(msg))
                if self.core.view is not None and self.core.view.revision > start:
                    return
            elif isinstance(msg, m.ViewRefused) and msg.reason == m.RefuseReason.NOT_MEMBER:
                # The view the coordinator chose after ``start`` leaves this peer out.
                self._answered(coord, start + 1, excluded=True)
                raise Evicted(self.me, msg.detail)
            else:
                await trio.sleep(self.config.timing.heartbeat_interval)
        if self.core.agreement_failed():
            self._notify()
            raise self.evicted()
        # Cut off from the coordinator side without being declared gone: to
        # the caller that is losing the peers it cannot agree with.
        unreachable = self.core.suspects or (set(d.members) - {self.me})
        raise PeerLost(unreachable, f"run {self.run}: no view agreed after revision {start}")


def _ballot_id(ballot: Ballot) -> m.BallotId:
    return m.BallotId(ballot.number, ballot.coordinator)


def _ballot_of(wire: m.BallotId) -> Ballot:
    return Ballot(wire.number, wire.coordinator)


def _decision_of(msg: m.ViewCommit) -> Decision:
    return Decision(msg.revision, msg.members, msg.incarnations)


def _vote_of(msg: m.ViewVote, revision: int) -> Vote:
    """A vote off the wire; an accepted view is of ``revision`` (the one chosen)."""
    promised = _ballot_of(msg.promised) if msg.promised else None
    accepted = None
    if msg.accepted is not None:
        accepted = (_ballot_of(msg.accepted),
                    Decision(revision, msg.accepted_members, msg.accepted_incarnations))
    return Vote(msg.ok, promised, accepted)
