"""The per-run collectives engine: fault-tolerant ring all-reduce over a ``Fabric``.

``open_engine(fabric, run, members=...)`` yields an ``Engine``: the membership
driver (``collectives.driver``: heartbeats, failure detection, round views)
plus the collectives. An all-reduce:

1. runs the pipelined ring (``collectives.allreduce``) on the current view,
   into a scratch buffer; the caller's array is untouched so far;
2. exchanges a one-byte status with every member (``collectives.agree``, the
   round the p2p collectives and state sync end with too): a peer commits
   only when it has the whole result and no live member reports a failure,
   so survivors either all commit the same bytes or all raise ``PeerLost``
   (a peer that vanishes after the ring completed cannot make the others
   disagree). The status goes to suspects too: one that is alive after all
   (a false suspicion) hears the failure instead of committing a view the
   others leave. What no status exchange can settle is a peer that gives up on
   another just before that one's failure report arrives: it commits a
   result the rest retry. Its next call then fails the history check
   (``collectives.history``) and it leaves, to rejoin and resync before it
   contributes again;
3. copies the result into the caller's array.

On ``PeerLost`` with ``retry=True`` the survivors agree a new view (without
joiners) and run again; the result names exactly the peers whose inputs it
holds, and an average divides by their count.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from collectives.agree import agree, fail
from collectives.allreduce import Counters, RingJob, commit, ring_all_reduce
from collectives.api import AllReduceResult, Quant, ReduceOp
from collectives.arrays import Flat, destination, flatten
from collectives.chunking import layout
from collectives.driver import EngineConfig, MembershipDriver, sub_chunk_elems, view_digest
from collectives.fabric import Fabric
from collectives.history import Diverged, Histories
from collectives.quant import codec_for
from collectives.view import Decision
from peerd.errors import ConfigError, Evicted, PeerLost
from peerd.log import event

log = logging.getLogger("collectives.run")

__all__ = ["Engine", "EngineConfig", "Evicted", "open_engine"]


def parse_op(op: ReduceOp | str) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    try:
        return ReduceOp[str(op).upper()]
    except KeyError:
        raise ConfigError(f"unknown reduce op {op!r}: use 'sum' or 'avg'") from None


@dataclass
class _Op:
    members: frozenset[str]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    lost: set[str] = field(default_factory=set)
    in_status: bool = False  # past the ring: losing a peer no longer aborts
    why: str = ""  # what the ring found, for the caller's error


class Engine(MembershipDriver):
    """Membership and round views of one run, plus its collectives."""

    def __init__(self, fabric: Fabric, run: str, config: EngineConfig | None = None) -> None:
        super().__init__(fabric, run, config)
        self._active: dict[str, _Op] = {}
        self._seq: dict[tuple[int, str], int] = {}
        self._history = Histories(self)  # per tag, where this peer last committed
        self.on_lost(self._abort_ops)

    def _abort_ops(self, peers: frozenset[str], why: str) -> None:
        for op in self._active.values():
            hit = op.members & peers
            if hit and not op.in_status:
                op.lost |= hit
                op.why = op.why or why
                op.scope.cancel()

    async def all_reduce(
        self,
        array: Any,
        op: ReduceOp | str = ReduceOp.AVG,
        *,
        tag: str = "default",
        quant: Quant = Quant.NONE,
        retry: bool = True,
        out: Any = None,
    ) -> AllReduceResult:
        """Reduce ``array`` (numpy or torch CPU; fp32, fp16 or bf16) over the view,
        in place, or into ``out`` (same size and dtype, memory of its own).

        Every member must call this with the same ``tag``, shape, dtype, op
        and quant. Concurrent calls need distinct tags. Raises ``PeerLost``
        naming the lost peers (``retry=False``, or retries exhausted) and
        ``Evicted`` if this peer was dropped; ``array`` is then unchanged (an
        ``out`` holds unspecified values). With ``out`` the array is only read
        and, unquantized, the ring runs in ``out``'s memory: no copy of the
        result (``collectives.allreduce``).
        """
        reduce_op = parse_op(op)
        flat = flatten(array, written=out is None)
        dest = destination(flat, out)
        codec = codec_for(Quant(quant), flat.kind)
        if tag in self._active:
            raise ConfigError(f"an all-reduce with tag {tag!r} is already running")
        start = trio.current_time()
        self.counters["all_reduces"] += 1
        total = Counters()
        attempts = 0
        while True:
            attempts += 1
            d = self.core.view
            if d is None or not self.core.is_member:
                # A stranded peer's view still names it, but the others went on.
                raise self.evicted() if d is not None else ConfigError("join the run first")
            counters = Counters()
            try:
                phases = await self._attempt(d, flat, dest, codec, reduce_op, tag, counters)
            except PeerLost as exc:
                self.counters["failed"] += 1
                event(
                    log,
                    "collectives.all_reduce_failed",
                    me=self.me,
                    tag=tag,
                    revision=d.revision,
                    attempt=attempts,
                    error=str(exc),
                )
                if self.core.stranded and not isinstance(exc, Evicted):
                    raise self.evicted() from exc
                if isinstance(exc, Evicted) or not retry or attempts >= self.config.max_attempts:
                    raise
                await self.reform(after=d.revision)
                continue
            finally:
                total.sent += counters.sent
                total.received += counters.received
                self.counters["sent"] += counters.sent
                self.counters["received"] += counters.received
            return AllReduceResult(
                d.members,
                d.revision,
                total.sent,
                total.received,
                trio.current_time() - start,
                attempts,
                phases,
            )

    async def _attempt(
        self, d: Decision, flat: Flat, dest: Flat, codec: Any, op: ReduceOp, tag: str,
        counters: Counters,
    ) -> tuple[tuple[str, float], ...]:
        seq = self._seq.get((d.revision, tag), 0)
        self._seq = {k: v for k, v in self._seq.items() if k[0] >= d.revision}
        self._seq[(d.revision, tag)] = seq + 1
        prefix = f"ar/{self.run}/{d.revision}.{view_digest(d)}/{tag}/{seq}/".encode()
        members = frozenset(d.members)
        what = f"all-reduce {tag!r}"
        gone = members & self.core.suspects
        if gone:
            fail(self, d, prefix, gone, trio.current_time() + self.config.phase_timeout,
                 f"{what} (already known to be gone)")
        peers = len(d.members)
        lay = layout(flat.size, peers, sub_chunk_elems(self.config, flat.size, peers),
                     codec.wire_size)
        phase = self.config.phase_timeout + lay.total / self.config.min_bandwidth
        now = trio.current_time()
        job = RingJob(
            d.members,
            d.members.index(self.me),
            flat,
            dest,
            codec,
            lay,
            op is ReduceOp.AVG,
            prefix,
            now + phase,
            now + 2 * phase,
            now + self.config.phase_timeout,
            self._history.of(tag),
            self.config.use_threads(),
        )
        state = _Op(members)
        self._active[tag] = state
        try:
            gathered = None
            out_of_line: Diverged | None = None
            with state.scope, self._while_member():
                try:
                    gathered = await ring_all_reduce(self.fabric, job, counters)
                except Diverged as exc:
                    out_of_line = exc
                except PeerLost as exc:
                    state.lost |= set(exc.peers) & members
                    state.why = state.why or exc.detail
                    self.lost(set(exc.peers) & members, str(exc))
            if out_of_line is not None:
                # Outside the op's scope, which the others' reaction may already
                # have cancelled.
                raise await self.step_out(out_of_line) from out_of_line
            if gathered is None:
                lost = state.lost or (members - {self.me})
                fail(self, d, prefix, lost, trio.current_time() + self.config.phase_timeout, what,
                     state.why)
            state.in_status = True  # from here on only the status round decides
            ringed = trio.current_time()
            await agree(self, d, prefix, set(), now + 3 * phase, what)
            agreed = trio.current_time()
            await commit(job, gathered)
            self._history.record(tag, d.revision, seq)
            return (("ring", ringed - now), ("status", agreed - ringed),
                    ("copy", trio.current_time() - agreed))
        finally:
            del self._active[tag]
            self.fabric.drop_data(prefix)


@asynccontextmanager
async def open_engine(
    fabric: Fabric,
    run: str,
    *,
    members: tuple[str, ...] | list[str] | None = None,
    config: EngineConfig | None = None,
) -> AsyncIterator[Engine]:
    """Run the engine of ``run`` on ``fabric`` for the duration of the block.

    Peers started with the same ``members`` share revision 0 at once (ring
    sorted by id); a peer started without ``members`` calls ``join()``.
    """
    engine = Engine(fabric, run, config)
    async with trio.open_nursery() as nursery:
        engine._start(nursery, tuple(members) if members is not None else None)
        try:
            yield engine
        finally:
            engine._stop()
            nursery.cancel_scope.cancel()
