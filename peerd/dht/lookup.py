"""Iterative Kademlia lookup as a state machine (sans-I/O).

The driver calls ``poll(now)`` and gets back which peers to query, which
requests just timed out, when to wake next, and whether the lookup is done; it
feeds answers back with ``on_response`` / ``on_failure``. At most ``alpha``
requests are in flight. A node lookup ends when the ``k`` nearest peers not
known to have failed have all answered; a value lookup also ends as soon as
``value_quorum`` peers have returned values.

``depth`` of a peer is the length of the chain of answers that led to it (the
seeds from our own table have depth 1), so ``hops`` measures the sequential
round trips a lookup needed independently of how the driver schedules them.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peerd.dht.routing import Contact, key_id
from peerd.identity import PeerId


class QueryState(enum.Enum):
    WAITING = "waiting"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class LookupStep:
    send: tuple[Contact, ...]
    timed_out: tuple[Contact, ...]
    wake_at: float | None
    done: bool


@dataclass(frozen=True)
class LookupResult:
    target: bytes
    closest: tuple[Contact, ...]  # nearest peers that answered, nearest first
    holders: tuple[Contact, ...]  # peers that returned values, nearest first
    hops: int
    messages: int
    failures: int


class _Candidate:
    __slots__ = ("contact", "deadline", "depth", "distance", "state")

    def __init__(self, contact: Contact, distance: int, depth: int) -> None:
        self.contact = contact
        self.distance = distance
        self.depth = depth
        self.state = QueryState.WAITING
        self.deadline = 0.0


class Lookup:
    """One FIND_NODE / FIND_VALUE lookup for ``target`` (32 bytes)."""

    def __init__(
        self, own: PeerId, target: bytes, seeds: Iterable[Contact], *, k: int = 20,
        alpha: int = 3, request_timeout: float = 5.0, value_quorum: int | None = None,
        max_candidates: int | None = None,
    ) -> None:
        self.target = target
        self._t = key_id(target)
        self._own = own.raw
        self.k = k
        self.alpha = alpha
        self.request_timeout = request_timeout
        self.value_quorum = value_quorum
        self._max_candidates = max_candidates if max_candidates is not None else 8 * k
        self._by_id: dict[bytes, _Candidate] = {}
        self._order: list[tuple[int, bytes]] = []  # (distance, raw id), nearest first
        self._holders: list[_Candidate] = []
        self._flying: dict[bytes, _Candidate] = {}
        self._messages = 0
        self._failures = 0
        self._hops = 0
        self._done = False
        for c in seeds:
            self._add(c, depth=1)

    # ------------------------------------------------------------ inputs

    def _add(self, contact: Contact, depth: int) -> None:
        raw = contact.peer_id.raw
        if raw == self._own:
            return
        known = self._by_id.get(raw)
        if known is not None:
            known.depth = min(known.depth, depth)
            return
        distance = contact.nid ^ self._t
        if len(self._order) >= self._max_candidates and distance >= self._order[-1][0]:
            return
        cand = _Candidate(contact, distance, depth)
        self._by_id[raw] = cand
        bisect.insort(self._order, (distance, raw))
        self._trim()

    def _trim(self) -> None:
        # Bound memory against peers that answer with floods of far-away contacts:
        # drop the farthest not-yet-queried candidates beyond the cap.
        i = len(self._order) - 1
        while len(self._order) > self._max_candidates and i >= 0:
            raw = self._order[i][1]
            if self._by_id[raw].state is QueryState.WAITING:
                del self._order[i]
                del self._by_id[raw]
            i -= 1

    def on_response(
        self, peer: PeerId, contacts: Sequence[Contact], now: float, has_value: bool = False
    ) -> None:
        """``peer`` answered with ``contacts`` (and values when ``has_value``)."""
        cand = self._by_id.get(peer.raw)
        if cand is None or cand.state is QueryState.SUCCEEDED:
            return
        if cand.state is QueryState.IN_FLIGHT:
            del self._flying[peer.raw]
        # A late answer after a timeout still counts: the peer is slow, not gone.
        cand.state = QueryState.SUCCEEDED
        self._hops = max(self._hops, cand.depth)
        if has_value:
            self._holders.append(cand)
        for c in contacts:
            self._add(c, cand.depth + 1)
        self._check_done()

    def on_failure(self, peer: PeerId, now: float) -> None:
        cand = self._by_id.get(peer.raw)
        if cand is None or cand.state is not QueryState.IN_FLIGHT:
            return
        del self._flying[peer.raw]
        self._failures += 1
        cand.state = QueryState.FAILED
        self._check_done()

    # ------------------------------------------------------------ decisions

    def poll(self, now: float) -> LookupStep:
        """Expire overdue requests, start new ones up to ``alpha``, say when to wake."""
        timed_out: list[Contact] = []
        for raw, cand in list(self._flying.items()):
            if cand.deadline <= now:
                cand.state = QueryState.FAILED
                del self._flying[raw]
                self._failures += 1
                timed_out.append(cand.contact)
        self._check_done()
        send: list[Contact] = []
        if not self._done:
            for cand in self._frontier():
                if len(self._flying) >= self.alpha:
                    break
                if cand.state is QueryState.WAITING:
                    cand.state = QueryState.IN_FLIGHT
                    cand.deadline = now + self.request_timeout
                    self._flying[cand.contact.peer_id.raw] = cand
                    self._messages += 1
                    send.append(cand.contact)
            if not self._flying:
                self._done = True  # nothing left to ask within the k nearest
        deadlines = [c.deadline for c in self._flying.values()]
        return LookupStep(
            send=tuple(send),
            timed_out=tuple(timed_out),
            wake_at=min(deadlines) if deadlines and not self._done else None,
            done=self._done,
        )

    def _frontier(self) -> list[_Candidate]:
        """The k nearest candidates not known to have failed."""
        out: list[_Candidate] = []
        for _, raw in self._order:
            cand = self._by_id[raw]
            if cand.state is not QueryState.FAILED:
                out.append(cand)
                if len(out) == self.k:
                    break
        return out

    def _check_done(self) -> None:
        if self._done:
            return
        if self.value_quorum is not None and len(self._holders) >= self.value_quorum:
            self._done = True
            return
        # Done when the k nearest not-failed candidates have all answered.
        seen = 0
        for _, raw in self._order:
            state = self._by_id[raw].state
            if state is QueryState.FAILED:
                continue
            if state is not QueryState.SUCCEEDED:
                return
            seen += 1
            if seen == self.k:
                break
        if seen:
            self._done = True

    # ------------------------------------------------------------ outputs

    @property
    def done(self) -> bool:
        return self._done

    @property
    def in_flight(self) -> int:
        return len(self._flying)

    def state_of(self, peer: PeerId) -> QueryState | None:
        cand = self._by_id.get(peer.raw)
        return cand.state if cand is not None else None

    def result(self) -> LookupResult:
        answered = [
            self._by_id[raw].contact for _, raw in self._order
            if self._by_id[raw].state is QueryState.SUCCEEDED
        ]
        holders = sorted(self._holders, key=lambda c: c.distance)
        return LookupResult(
            target=self.target,
            closest=tuple(answered[: self.k]),
            holders=tuple(c.contact for c in holders),
            hops=self._hops,
            messages=self._messages,
            failures=self._failures,
        )
