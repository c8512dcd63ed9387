"""Point-to-point and custom collectives over a run's round view (trio driver).

``send``/``recv`` move one array between two members of the current view;
``broadcast``, ``all_gather`` and ``reduce_scatter`` are built from them and
end with a status round (``collectives.agree``), so every survivor either
succeeds with the same data or raises ``PeerLost`` naming the lost peers,
and the caller's arrays are written only on success; a gather or
reduce-scatter also compares every sender's history before its data counts
(``collectives.history``). Operations are matched
by (view, tag, per-tag sequence number): members must issue the same
sequence per tag, like any collective library. With ``retry=True`` a failed
gather or reduce-scatter re-forms the view among the survivors and runs
again; the result names exactly whose data it holds.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import trio

from collectives.agree import agree, fail, live_others, op_prefix, recv_from, send_to
from collectives.api import ReduceOp
from collectives.arrayio import (
    as_array,
    chunk_bounds,
    copy_of,
    nbytes_of,
    pack,
    unpack,
    write_into,
)
from collectives.driver import MembershipDriver
from collectives.history import Diverged, Histories, diverged, odd_histories
from collectives.statemsg import ArrayHeader
from collectives.view import Decision
from peerd.errors import ConfigError, Evicted, PeerLost, ProtocolError
from peerd.wire import decode_untrusted

T = TypeVar("T")


@dataclass(frozen=True)
class Scattered:
    """This member's share of a reduce-scatter: elements ``[lo, hi)`` of the
    flattened input, reduced over ``participants``."""

    chunk: np.ndarray
    lo: int
    hi: int
    participants: tuple[str, ...]
    revision: int


@dataclass(frozen=True)
class P2PStats:
    sends: int
    recvs: int
    collectives: int
    failed: int
    bytes_sent: int
    bytes_received: int


class PointToPoint:
    """Custom collectives of one run; get it with ``PointToPoint.of(engine)``."""

    _by_driver: weakref.WeakKeyDictionary[MembershipDriver, PointToPoint] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def of(cls, driver: MembershipDriver) -> PointToPoint:
        if driver not in cls._by_driver:
            cls._by_driver[driver] = cls(driver)
        return cls._by_driver[driver]

    def __init__(self, driver: MembershipDriver) -> None:
        self.driver = driver
        self._seq: dict[tuple[Any, ...], int] = {}
        self._history = Histories(driver)  # per (kind, tag) of a retried collective
        self._c = {"sends": 0, "recvs": 0, "collectives": 0, "failed": 0, "sent": 0,
                   "received": 0}

    def statistics(self) -> P2PStats:
        c = self._c
        return P2PStats(c["sends"], c["recvs"], c["collectives"], c["failed"], c["sent"],
                        c["received"])

    # ------------------------------------------------------------ helpers

    def _decision(self) -> Decision:
        self.driver.view()  # raises Evicted / ConfigError when not a member
        d = self.driver.core.view
        assert d is not None
        return d

    def _next(self, d: Decision, *key: Any) -> int:
        full = (d.revision, *key)
        seq = self._seq.get(full, 0)
        self._seq = {k: v for k, v in self._seq.items() if k[0] >= d.revision}
        self._seq[full] = seq + 1
        return seq

    def _member(self, d: Decision, peer: str) -> str:
        peer = str(getattr(peer, "text", peer))
        if peer not in d.members or peer == self.driver.me:
            raise ConfigError(f"{peer} is not another member of revision {d.revision}")
        if peer in self.driver.core.suspects:
            raise PeerLost([peer], "already known to be gone")
        return peer

    def _deadline(self, nbytes: int, timeout: float | None = None) -> float:
        cfg = self.driver.config
        span = timeout if timeout is not None else cfg.phase_timeout + nbytes / cfg.min_bandwidth
        return trio.current_time() + span

    async def _put(self, peer: str, prefix: bytes, array: Any, deadline: float) -> None:
        header, body = pack(array)
        await send_to(self.driver, peer, prefix + b"h", header, deadline)
        if len(body):
            await send_to(self.driver, peer, prefix + b"b", body, deadline)
        self._c["sent"] += len(header) + len(body)

    async def _get(self, peer: str, prefix: bytes, deadline: float, what: str) -> Any:
        header = bytes(await recv_from(self.driver, peer, prefix + b"h", deadline, what))
        try:
            h: ArrayHeader = decode_untrusted(header, expect=ArrayHeader)
            body: bytes | memoryview = b""
            if h.nbytes:
                body = await recv_from(self.driver, peer, prefix + b"b", deadline, what)
            array = unpack(header, body)
        except ProtocolError as exc:
            self.driver.lost({peer}, f"{what}: {exc}")
            raise PeerLost([peer], f"{what}: {exc}") from None
        self._c["received"] += len(header) + len(body)
        return array

    # ------------------------------------------------------------ point to point

    async def send(self, peer: str, array: Any, *, tag: str = "p2p",
                   timeout: float | None = None) -> None:
        """Send ``array`` to member ``peer``, whose matching ``recv(me, tag)``
        receives it. Raises ``PeerLost([peer])`` if it is lost or the deadline
        (default: phase timeout plus size at the minimum bandwidth) passes."""
        d = self._decision()
        peer = self._member(d, peer)
        seq = self._next(d, "s", peer, tag)
        prefix = op_prefix("pp", self.driver.run, d, f"{tag}|{self.driver.me}>{peer}", seq)
        self._c["sends"] += 1
        await self._put(peer, prefix, array, self._deadline(nbytes_of(array), timeout))

    async def recv(self, peer: str, *, tag: str = "p2p", timeout: float | None = None) -> Any:
        """The next array ``peer`` sends with ``tag`` (a new numpy array; torch for
        bfloat16). Waits as long as ``peer`` is alive, or ``timeout`` seconds."""
        d = self._decision()
        peer = self._member(d, peer)
        seq = self._next(d, "r", peer, tag)
        prefix = op_prefix("pp", self.driver.run, d, f"{tag}|{peer}>{self.driver.me}", seq)
        self._c["recvs"] += 1
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        return await self._get(peer, prefix, deadline, f"recv {tag!r}")

    # ------------------------------------------------------------ collectives

    async def _retrying(self, retry: bool,
                        attempt: Callable[[Decision], Awaitable[T]]) -> T:
        tries = 0
        while True:
            tries += 1
            d = self._decision()
            self._c["collectives"] += 1
            try:
                return await attempt(d)
            except Diverged as exc:
                self._c["failed"] += 1
                raise await self.driver.step_out(exc) from exc
            except PeerLost as exc:
                self._c["failed"] += 1
                last = tries >= self.driver.config.max_attempts
                if isinstance(exc, Evicted) or not retry or last:
                    raise
                await self.driver.reform(after=d.revision)

    async def _exchange(self, d: Decision, prefix: bytes, outgoing: dict[str, Any],
                        sources: list[str], deadline: float, what: str,
                        history: bytes | None = None) -> dict[str, Any]:
        """Send ``outgoing[p]`` to each member ``p`` and receive one array from
        each of ``sources``; then agree. Returns what arrived, by sender. With
        a ``history`` mark (``collectives.history``), every sender's is compared
        with it before its data counts."""
        got: dict[str, Any] = {}
        marks: dict[str, bytes] = {}
        lost: set[str] = set(d.members) & self.driver.core.suspects
        # A loss ends the exchange at once, for the status round to fail the
        # attempt everywhere: a member that already knew of it when it came
        # sends nothing, and waiting for its data would last to the deadline.
        exchange = trio.CancelScope()

        def lose(exc: PeerLost) -> None:
            lost.update(exc.peers)
            exchange.cancel()

        async def put(peer: str) -> None:
            try:
                if history is not None:
                    await send_to(self.driver, peer, prefix + b"m", history, deadline)
                await self._put(peer, prefix, outgoing[peer], deadline)
            except PeerLost as exc:
                lose(exc)

        async def get(peer: str) -> None:
            try:
                if history is not None:
                    marks[peer] = bytes(await recv_from(self.driver, peer, prefix + b"m",
                                                        deadline, what))
                got[peer] = await self._get(peer, prefix, deadline, what)
            except PeerLost as exc:
                lose(exc)

        if not lost:
            with exchange:
                async with trio.open_nursery() as nursery:
                    for peer in live_others(self.driver, d):
                        if peer in outgoing:
                            nursery.start_soon(put, peer)
                        if peer in sources:
                            nursery.start_soon(get, peer)
        me = self.driver.me
        if history is not None and any(diverged(history, m) for m in marks.values()):
            odd = odd_histories({**marks, me: history})
            detail = f"{what}: completed a collective the other members did not (or the reverse)"
            if me in odd:
                with suppress(PeerLost):  # the others hear that this peer is out of line
                    fail(self.driver, d, prefix, {me}, deadline, what)
                raise Diverged([me], detail)
            self.driver.lost(odd, detail)
            lost |= odd
        await agree(self.driver, d, prefix, lost - {me}, deadline, what)
        return got

    async def all_gather(self, array: Any, *, tag: str = "gather",
                         retry: bool = True) -> tuple[list[Any], tuple[str, ...]]:
        """Every member's ``array`` (shapes and dtypes may differ), in view order,
        and the members they came from."""
        own = as_array(array)

        async def attempt(d: Decision) -> tuple[list[Any], tuple[str, ...]]:
            seq = self._next(d, "g", tag)
            prefix = op_prefix("ag", self.driver.run, d, tag, seq)
            others = [p for p in d.members if p != self.driver.me]
            deadline = self._deadline(nbytes_of(own) * len(d.members))
            got = await self._exchange(d, prefix, dict.fromkeys(others, own), others, deadline,
                                       f"all_gather {tag!r}", self._history.of(("g", tag)))
            self._history.record(("g", tag), d.revision, seq)
            got[self.driver.me] = copy_of(own)
            return [got[p] for p in d.members], d.members

        return await self._retrying(retry, attempt)

    async def broadcast(self, array: Any, root: str, *, tag: str = "broadcast") -> tuple[str, ...]:
        """Make every member's ``array`` equal to ``root``'s, in place (same shape
        and dtype everywhere); returns the members. No retry: the root may be gone."""
        d = self._decision()
        root = str(getattr(root, "text", root))
        if root not in d.members:
            raise ConfigError(f"broadcast root {root} is not a member of revision {d.revision}")
        prefix = op_prefix("bc", self.driver.run, d, tag, self._next(d, "b", tag))
        deadline = self._deadline(nbytes_of(array) * len(d.members))
        self._c["collectives"] += 1
        me = self.driver.me
        outgoing = {p: array for p in d.members if p != me} if root == me else {}
        got = await self._exchange(d, prefix, outgoing, [] if root == me else [root], deadline,
                                   f"broadcast {tag!r}")
        if root != me:
            write_into(array, got[root])
        return d.members

    async def reduce_scatter(self, array: Any, op: ReduceOp | str = ReduceOp.AVG, *,
                             tag: str = "reduce_scatter", retry: bool = True) -> Scattered:
        """Reduce the flattened ``array`` over the view and return this member's
        chunk (``chunk_bounds`` by rank), summed in view order in fp32 (fp64 for
        fp64 input), so the owner's result is deterministic. ``array`` is not
        written."""
        flat = np.ascontiguousarray(as_array(array)).reshape(-1)
        if flat.dtype not in (np.float16, np.float32, np.float64):
            raise ConfigError(f"reduce_scatter needs float16/32/64 arrays, got {flat.dtype}")
        reduce_op = op if isinstance(op, ReduceOp) else ReduceOp[str(op).upper()]
        acc_type: Any = np.float64 if flat.dtype == np.float64 else np.float32

        async def attempt(d: Decision) -> Scattered:
            seq = self._next(d, "rs", tag)
            prefix = op_prefix("rs", self.driver.run, d, tag, seq)
            bounds = chunk_bounds(flat.size, len(d.members))
            out = {p: flat[lo:hi] for p, (lo, hi) in zip(d.members, bounds, strict=True)}
            lo, hi = bounds[d.members.index(self.driver.me)]
            others = [p for p in d.members if p != self.driver.me]
            got = await self._exchange(d, prefix, out, others, self._deadline(flat.nbytes * 2),
                                       f"reduce_scatter {tag!r}", self._history.of(("rs", tag)))
            self._history.record(("rs", tag), d.revision, seq)
            got[self.driver.me] = flat[lo:hi]
            acc: Any = np.zeros(hi - lo, dtype=acc_type)
            for p in d.members:
                part = np.asarray(got[p])
                if part.shape != (hi - lo,) or part.dtype != flat.dtype:
                    raise ProtocolError(f"{p} sent a reduce_scatter part of the wrong shape")
                acc += part
            if reduce_op is ReduceOp.AVG:
                acc /= acc_type(len(d.members))
            return Scattered(acc.astype(flat.dtype), lo, hi, d.members, d.revision)

        return await self._retrying(retry, attempt)
