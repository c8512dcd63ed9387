"""``LocalGroup``: a single-process ``Collective`` for tests and examples.

Each of n members is driven from its own thread and gets a ``Collective`` via
``group.member(i)``. Operations are matched by each member's operation count
(every member must issue the same sequence of collectives, as with any real
collective library). Results are computed once, under one lock, summing in
view (rank) order in fp32, so every member receives bit-identical values.

Failure and membership:
- ``group.kill(i)`` removes a member at once (a peer dying mid-round). An
  operation it had not finished is retried over the survivors when the caller
  passed ``retry=True`` (the result names exactly who took part), otherwise it
  fails with ``PeerLost`` on every survivor; inputs are left untouched.
- ``group.add_member()`` creates a joiner. Its first call must be a round
  boundary, ``sync_state`` or ``update_view``; it is admitted when the current
  members finish their next boundary of that kind, never in the middle of an
  operation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from collectives.api import (
    AllReduceResult,
    Collective,
    Quant,
    ReduceOp,
    SyncResult,
    SyncStrategy,
    View,
)
from collectives.arrays import destination, flatten
from collectives.local_ops import (
    LocalArrays,
    popular_state,
    quantize_roundtrip,
    reduce_in_order,
    ring_bytes,
    state_digest,
    to_numpy,
    write_back,
)
from peerd.errors import ConfigError, PeerLost, Timeout

OP_TIMEOUT = 120.0  # seconds a member waits for the others before giving up
# Round boundaries (op kinds), where joiners are admitted, and their tags.
BOUNDARIES = {"sync": "state", "view": "view"}


@dataclass
class _Op:
    seq: int
    kind: str  # "reduce" | "gather" | "sync" | "view"
    tag: str
    participants: list[str]
    revision: int
    retry: bool
    contributions: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    failed: PeerLost | None = None
    attempts: int = 1
    result: Any = None
    collected: set[str] = field(default_factory=set)


class LocalGroup:
    """n in-process members; see the module docstring for the semantics."""

    def __init__(self, n: int, *, run: str = "local", timeout: float = OP_TIMEOUT) -> None:
        if n < 1:
            raise ConfigError("LocalGroup needs at least one member")
        self.run = run
        self.timeout = timeout
        self._cond = threading.Condition()
        self._names: list[str] = [f"m{i}" for i in range(n)]
        self._members: list[str] = list(self._names)
        self._revision = 1
        self._dead: set[str] = set()
        self._next_seq: dict[str, int] = {m: 0 for m in self._members}
        self._ops: dict[int, _Op] = {}
        # name -> (boundary kind, contribution) once its first call arrives
        self._joiners: dict[str, tuple[str, Any] | None] = {}
        self._admitted: dict[str, int] = {}  # joiner name -> seq of the sync that admitted it

    # -- membership ---------------------------------------------------------------------------
    def member(self, i: int) -> LocalCollective:
        return LocalCollective(self, self._names[i])

    def add_member(self) -> int:
        """Create a joiner; returns its index for ``member``."""
        with self._cond:
            name = f"m{len(self._names)}"
            self._names.append(name)
            self._joiners[name] = None
            return len(self._names) - 1

    def kill(self, i: int) -> None:
        """Remove member i now: in-flight operations retry or fail (per their flag)."""
        name = self._names[i]
        with self._cond:
            if name in self._dead:
                return
            self._dead.add(name)
            self._joiners.pop(name, None)
            if name in self._members:
                self._members.remove(name)
                self._revision += 1
            for op in self._ops.values():
                if op.done or op.failed is not None or name not in op.participants:
                    continue
                if op.retry or op.kind != "reduce":
                    op.participants.remove(name)
                    op.contributions.pop(name, None)
                    op.attempts += 1
                    self._maybe_complete(op)
                else:
                    op.failed = PeerLost([name], f"during {op.kind} {op.tag!r}")
            self._cond.notify_all()

    def wait_for_joiners(self, n: int = 1) -> None:
        """Block until ``n`` joiners have called ``sync_state`` or ``update_view``
        (tests use this to make the admitting round deterministic)."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while sum(e is not None for e in self._joiners.values()) < n:
                self._wait(deadline, "joiners")

    def members(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(self._members)

    def view_of(self, name: str) -> View:
        with self._cond:
            return View(self.run, self._revision, tuple(self._members), name)

    # -- operations ---------------------------------------------------------------------------
    def submit(self, name: str, kind: str, tag: str, payload: Any, retry: bool) -> int:
        """Register ``name``'s contribution to its next operation; returns the op's seq."""
        with self._cond:
            self._check_alive(name)
            if name in self._joiners:
                if kind not in BOUNDARIES:
                    raise ConfigError("a joining member must call sync_state or update_view "
                                      "first: a round boundary is where it is admitted")
                self._joiners[name] = (kind, payload)
                if not self._members:
                    self._admit_alone(kind)
                self._cond.notify_all()  # wakes wait_for_joiners
                return -1
            seq = self._next_seq[name]
            self._next_seq[name] = seq + 1
            op = self._ops.get(seq)
            if op is None:
                op = _Op(seq, kind, tag, list(self._members), self._revision, retry)
                self._ops[seq] = op
            elif (op.kind, op.tag) != (kind, tag):
                raise ConfigError(
                    f"collective order differs between members: {name} issued {kind} {tag!r}"
                    f" where others issued {op.kind} {op.tag!r}"
                )
            if op.failed is None and not op.done and name in op.participants:
                op.contributions[name] = payload
                self._maybe_complete(op)
                self._cond.notify_all()
            return seq

    def collect(self, name: str, seq: int) -> tuple[_Op, Any]:
        """Block until op ``seq`` finishes; returns it and this member's own payload."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._check_alive(name)  # a removed member's ops may already be gone
            if seq < 0:
                while name not in self._admitted:
                    self._check_alive(name)
                    self._wait(deadline, "admission")
                seq = self._admitted.pop(name)
            op = self._ops[seq]
            while not op.done and op.failed is None:
                self._check_alive(name)
                self._wait(deadline, f"{op.kind} {op.tag!r}")
            self._check_alive(name)
            op.collected.add(name)
            if op.collected >= set(op.participants) - self._dead:
                del self._ops[seq]
            if op.failed is not None:
                raise op.failed
            return op, op.contributions.get(name)

    def is_done(self, seq: int) -> bool:
        with self._cond:
            op = self._ops.get(seq)
            return op is None or op.done or op.failed is not None

    def _wait(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"LocalGroup: no progress on {what} within {self.timeout} s")
        self._cond.wait(timeout=left)

    def _check_alive(self, name: str) -> None:
        if name in self._dead:
            raise PeerLost([name], "this member was removed from the group")

    def _admit_alone(self, kind: str) -> None:
        # With no member left, waiting joiners form the group among themselves.
        seq = max(self._next_seq.values(), default=0)
        while seq in self._ops:
            seq += 1
        op = _Op(seq, kind, BOUNDARIES[kind], [], self._revision, True)
        self._ops[seq] = op
        self._maybe_complete(op)
        self._cond.notify_all()

    def _admit_joiners(self, op: _Op) -> None:
        # Each at a boundary of the kind it called (its result is what it awaits).
        ready = {j: e[1] for j, e in self._joiners.items() if e is not None and e[0] == op.kind}
        for j, contribution in ready.items():
            del self._joiners[j]
            self._members.append(j)
            self._next_seq[j] = op.seq + 1
            self._admitted[j] = op.seq
            op.participants.append(j)
            op.contributions[j] = contribution
        if ready:
            self._revision += 1

    def _maybe_complete(self, op: _Op) -> None:
        if op.done or op.failed is not None:
            return
        if not set(op.participants) <= set(op.contributions):
            return
        if op.kind in BOUNDARIES:
            self._admit_joiners(op)
            op.revision = self._revision
        order = list(op.participants)
        if op.kind == "reduce":
            arrays = [op.contributions[m][0] for m in order]
            reduce_op = op.contributions[order[0]][1]
            op.result = reduce_in_order(arrays, reduce_op)
        elif op.kind == "gather":
            op.result = [op.contributions[m] for m in order]
        elif op.kind == "sync":
            op.result = popular_state({m: op.contributions[m] for m in order})
        op.participants = order
        op.done = True


@dataclass
class _LocalHandle:
    member: LocalCollective
    seq: int
    array: Any
    quant: Quant

    def wait(self) -> AllReduceResult:
        return self.member.finish_reduce(self.seq, self.array, self.quant)

    def done(self) -> bool:
        return self.member.group.is_done(self.seq)


class LocalCollective:
    """One member's ``Collective`` on a ``LocalGroup``."""

    def __init__(self, group: LocalGroup, name: str) -> None:
        self.group = group
        self.name = name

    def view(self) -> View:
        return self.group.view_of(self.name)

    def update_view(self) -> View:
        seq = self.group.submit(self.name, "view", BOUNDARIES["view"], (), True)
        op, _ = self.group.collect(self.name, seq)
        return View(self.group.run, op.revision, tuple(op.participants), self.name)

    def all_reduce(
        self,
        array: Any,
        op: ReduceOp | str = ReduceOp.AVG,
        *,
        tag: str = "default",
        quant: Quant = Quant.NONE,
        retry: bool = True,
        out: Any = None,
    ) -> AllReduceResult:
        return self.all_reduce_async(array, op, tag=tag, quant=quant, retry=retry,
                                     out=out).wait()

    def all_reduce_async(
        self,
        array: Any,
        op: ReduceOp | str = ReduceOp.AVG,
        *,
        tag: str = "default",
        quant: Quant = Quant.NONE,
        retry: bool = True,
        out: Any = None,
    ) -> _LocalHandle:
        reduce_op = ReduceOp[op.upper()] if isinstance(op, str) else ReduceOp(op)
        if out is not None:  # the engine's checks, so tests on this fake see its errors
            destination(flatten(array, written=False), out)
        payload = (quantize_roundtrip(to_numpy(array).astype(np.float32), quant), reduce_op)
        seq = self.group.submit(self.name, "reduce", tag, payload, retry)
        return _LocalHandle(self, seq, array if out is None else out, quant)

    def finish_reduce(self, seq: int, array: Any, quant: Quant) -> AllReduceResult:
        t0 = time.monotonic()
        op, _ = self.group.collect(self.name, seq)
        write_back(array, op.result)
        n_bytes = ring_bytes(len(op.participants), op.result.size, quant)
        return AllReduceResult(
            tuple(op.participants), op.revision, n_bytes, n_bytes, time.monotonic() - t0,
            op.attempts,
        )

    def all_gather(
        self, array: Any, *, tag: str = "gather", retry: bool = True
    ) -> tuple[Sequence[Any], tuple[str, ...]]:
        seq = self.group.submit(self.name, "gather", tag, to_numpy(array).copy(), retry)
        op, _ = self.group.collect(self.name, seq)
        return [a.copy() for a in op.result], tuple(op.participants)

    def sync_state(
        self,
        state: Mapping[str, Any],
        revision: int,
        *,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
    ) -> SyncResult:
        local = LocalArrays.capture(state)
        payload = (revision, strategy, local, state_digest(local.arrays))
        seq = self.group.submit(self.name, "sync", "state", payload, True)
        op, _ = self.group.collect(self.name, seq)
        winner, holders = op.result
        received: list[str] = []
        n_recv = 0
        if strategy != SyncStrategy.SEND_ONLY and winner is not None:
            for key, arr in winner.arrays.items():
                if local.hashes.get(key) != winner.hashes[key]:
                    write_back(state[key], arr)
                    received.append(key)
                    n_recv += arr.nbytes
        n_sent = 0
        if holders and holders[0] == self.name:
            n_sent = _bytes_owed(op, winner)
        return SyncResult(op.revision, tuple(op.participants), tuple(received), n_recv, n_sent)


def _bytes_owed(op: _Op, winner: LocalArrays) -> int:
    """What the first holder of the popular state sends to everyone who lacks it."""
    total = 0
    for name in op.participants:
        _, strategy, arrays, _ = op.contributions[name]
        if strategy == SyncStrategy.SEND_ONLY:
            continue
        for key, arr in winner.arrays.items():
            if arrays.hashes.get(key) != winner.hashes[key]:
                total += arr.nbytes
    return total


def _check_protocol(c: LocalCollective) -> Collective:
    return c  # mypy: LocalCollective satisfies the Collective protocol
