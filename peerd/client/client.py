"""``Client``: the training process's handle on its local daemon.

Satisfies ``collectives.api.Collective`` (``view``, ``all_reduce``,
``all_reduce_async``, ``all_gather``, ``sync_state``) for the run chosen at
connect time, or per call with ``run=``; adds status, peers, DHT, CRDT store
and point-to-point ``send``/``recv``. Tensors go through shared memory
(``arrays.py``); results are written back in place.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from collectives.api import (
    AllReduceResult,
    Quant,
    ReduceOp,
    SyncResult,
    SyncStrategy,
    View,
)
from peerd.client.arrays import SegmentPool, Staged, StagedReduce, check_out
from peerd.client.conn import Connection, wait
from peerd.client.copying import ParallelCopier
from peerd.daemon import protocol as p
from peerd.daemon.shm import Segment
from peerd.errors import ConfigError

# A dial may take the daemon's whole handshake timeout (``peerd.session``,
# 10 s). The client waits that long on top of its own timeout, so that the
# daemon's reason (no answer there, another swarm) reaches the user rather
# than a timeout of ours that blames the daemon.
DIAL_WAIT = 10.0

DEFAULT_TIMEOUT = 30.0  # control calls: status, peers, DHT, store
COLLECTIVE_TIMEOUT = 3600.0  # a round may wait long for stragglers to join
DEFAULT_RUN = "default"


def _view(reply: p.ViewReply) -> View:
    return View(reply.run, reply.revision, reply.members, reply.me)


def _op_name(op: ReduceOp | str) -> str:
    if isinstance(op, ReduceOp):
        return op.name.lower()
    if op.lower() in ("avg", "sum"):
        return op.lower()
    raise ConfigError(f"reduce op {op!r} is not 'avg' or 'sum'")


class ReduceHandle:
    """An all-reduce in flight; ``wait()`` writes the result into the array."""

    def __init__(self, fut: Future[Any], staged: StagedReduce, timeout: float | None) -> None:
        self._fut = fut
        self._staged = staged
        self._timeout = timeout
        self._result: AllReduceResult | None = None

    def done(self) -> bool:
        return self._fut.done()

    def wait(self, timeout: float | None = None) -> AllReduceResult:
        if self._result is not None:
            return self._result
        try:
            reply = wait(self._fut, timeout if timeout is not None else self._timeout)
        except BaseException:
            if self._fut.done():
                self._staged.done()
            else:  # the daemon may still write into the segment: free it later
                self._fut.add_done_callback(lambda _f: self._staged.done())
            raise
        try:
            self._staged.copy_back()
        finally:
            self._staged.done()
        self._result = AllReduceResult(reply.participants, reply.revision, reply.bytes_sent,
                                       reply.bytes_received, reply.seconds, reply.attempts)
        return self._result


class Client:
    """Blocking client of one local daemon; thread-safe. Use ``peerd.connect()``."""

    def __init__(self, conn: Connection, run: str = DEFAULT_RUN,
                 timeout: float = DEFAULT_TIMEOUT, copy_threads: int | None = None) -> None:
        self._conn = conn
        self.run = run
        self.timeout = timeout
        self._segment_ids = itertools.count(1)  # client ids > 0, daemon gifts < 0
        self._pool = SegmentPool(self._register, self._release)
        self._copier = ParallelCopier(copy_threads)
        hello = conn.call(lambda r: p.Hello(r, p.CONTROL_VERSION), timeout)
        self.peer_id: str = hello.peer_id
        self.features: tuple[str, ...] = hello.features

    # ------------------------------------------------------------ plumbing

    def _call(self, make: Any, timeout: float | None = None) -> Any:
        return self._conn.call(make, self.timeout if timeout is None else timeout)

    def _register(self, seg: Segment) -> int:
        seg_id = next(self._segment_ids)
        fd = seg.take_fd()
        try:
            self._conn.call(lambda r: p.RegisterSegment(r, seg_id, seg.size), self.timeout,
                            (fd,))
        finally:
            os.close(fd)
        return seg_id

    def _release(self, seg_id: int) -> None:
        if self._conn.alive:
            self._conn.request(lambda r: p.ReleaseSegment(r, seg_id))

    def _gifted(self, refs: Sequence[p.TensorRef]) -> list[np.ndarray]:
        """Views of daemon-made results; each gift is unmapped with its last view."""
        out = [self._conn.gifts.array(ref) for ref in refs]
        for seg_id in {ref.segment for ref in refs}:
            self._conn.gifts.release(seg_id)
        return out

    # ------------------------------------------------------------ node

    def status(self) -> p.StatusReply:
        return self._call(lambda r: p.StatusRequest(r))

    def peers(self) -> tuple[p.PeerInfo, ...]:
        return self._call(lambda r: p.PeersRequest(r)).peers

    def connect_peer(self, address: str) -> str:
        """Dial ``address`` from the daemon; returns the peer id."""
        return self._call(lambda r: p.ConnectRequest(r, address),
                          self.timeout + DIAL_WAIT).peer_id

    def echo(self, array: Any, mode: int = 0) -> bytes:
        """Diagnostic: hand ``array`` to the daemon and back (see ``EchoRequest``)."""
        staged = self._stage(array)
        try:
            reply = self._call(lambda r: p.EchoRequest(r, staged.ref, mode))
            staged.copy_back()
        finally:
            staged.done()
        return reply.digest

    # ------------------------------------------------------------ shared arrays

    def empty(self, shape: int | Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        """A numpy array in memory the daemon already maps: collectives on it (or on
        ``torch.from_numpy`` of it) copy nothing."""
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        return self._pool.new_shared(dims, np.dtype(dtype))

    def share(self, array: Any) -> np.ndarray:
        """A shared copy of ``array`` (see ``empty``)."""
        src = np.asarray(array)
        out = self.empty(src.shape, src.dtype)
        self._copier.copy(out, src)
        return out

    # ------------------------------------------------------------ Collective

    def join(self, members: Sequence[str] | None = None, *, run: str | None = None,
             timeout: float | None = None, phase_timeout: float | None = None) -> View:
        """Take part in the run. With ``members`` (peer ids, this daemon's among
        them) all listed peers start together; without, the run's members admit
        this daemon at their next round boundary. Returns the first view.

        ``Timeout`` when no member admitted it within ``timeout`` (default: the
        engine's join timeout, 300 s); the daemon is then not in the run, and
        a later ``join`` starts afresh.

        ``phase_timeout``: how long this daemon waits for the other members
        to come to a collective before it goes on without those missing
        (default 30 s; its data phases add the tensor's size at 10 Mbit/s),
        and to a round boundary (``sync_state``, ``update_view``; default
        60 s). Peers slower than that, a slow GPU at an outer step, are
        dropped from the round and rejoin at the next boundary; raise it
        where members' steps differ by more. Give every member the same
        value. It applies when the daemon joins, not to a run it is already
        in."""
        ms = tuple(members) if members is not None else None
        reply = self._call(lambda r: p.JoinRunRequest(r, run or self.run, ms, timeout,
                                                      phase_timeout),
                           COLLECTIVE_TIMEOUT if timeout is None else timeout + 5.0)
        return _view(reply)

    def leave(self, *, run: str | None = None) -> None:
        self._call(lambda r: p.LeaveRunRequest(r, run or self.run))

    def view(self, *, run: str | None = None) -> View:
        reply = self._call(lambda r: p.ViewRequest(r, run or self.run))
        return _view(reply)

    def update_view(self, *, run: str | None = None) -> View:
        """A round boundary: agree the next view with the run's members and
        admit the joiners waiting (``join()`` without members returns once
        one admits it). Every member calls it at the same point of its loop,
        as with a collective; ``sync_state`` is a round boundary too, and
        all-reduces are not: a loop of all-reduces alone admits nobody."""
        reply = self._call(lambda r: p.UpdateViewRequest(r, run or self.run),
                           COLLECTIVE_TIMEOUT)
        return _view(reply)

    def all_reduce_async(self, array: Any, op: ReduceOp | str = ReduceOp.AVG, *,
                         tag: str = "default", quant: Quant = Quant.NONE, retry: bool = True,
                         run: str | None = None, timeout: float | None = COLLECTIVE_TIMEOUT,
                         out: Any = None) -> ReduceHandle:
        """Start an all-reduce; ``wait()`` returns the result and writes it into
        ``array``, or into ``out`` (same size and dtype; ``array`` is then only read)."""
        name = _op_name(op)
        if out is not None:  # checked here too: the daemon sees staged copies
            check_out(array, out)
        source = self._stage(array)
        dest: Staged | None = None
        try:
            if out is not None:
                dest = Staged(self._pool, out, self._copier, fill=False)
            elif source.leased:
                # A staged array's result goes to a segment of its own: the
                # daemon's ring then runs in that segment's memory rather than
                # copying its result into the input's (collectives.allreduce).
                dest = Staged(self._pool, array, self._copier, fill=False)
            out_ref = dest.ref if dest is not None else None
            fut = self._conn.request(lambda r: p.AllReduceRequest(
                r, run or self.run, source.ref, name, tag, int(Quant(quant)), retry, out_ref))
        except BaseException:
            StagedReduce(source, dest).done()
            raise
        return ReduceHandle(fut, StagedReduce(source, dest), timeout)

    def all_reduce(self, array: Any, op: ReduceOp | str = ReduceOp.AVG, *,
                   tag: str = "default", quant: Quant = Quant.NONE, retry: bool = True,
                   run: str | None = None, timeout: float | None = COLLECTIVE_TIMEOUT,
                   out: Any = None) -> AllReduceResult:
        return self.all_reduce_async(array, op, tag=tag, quant=quant, retry=retry, run=run,
                                     timeout=timeout, out=out).wait()

    def all_gather(self, array: Any, *, tag: str = "gather", retry: bool = True,
                   run: str | None = None) -> tuple[Sequence[Any], tuple[str, ...]]:
        staged = self._stage(array)
        try:
            reply = self._call(lambda r: p.AllGatherRequest(r, run or self.run, staged.ref, tag,
                                                            retry), COLLECTIVE_TIMEOUT)
        finally:
            staged.done()
        arrays: list[Any] = self._gifted(reply.tensors)
        if staged.dtype == p.BF16_DTYPE:  # the members' bits, as the tensors they were
            import torch

            arrays = [torch.from_numpy(a).view(torch.bfloat16) for a in arrays]
        return arrays, reply.peers

    def sync_state(self, state: Mapping[str, Any], revision: int, *,
                   strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
                   run: str | None = None) -> SyncResult:
        names = tuple(state)
        staged: list[Staged] = []
        try:
            for n in names:
                staged.append(self._stage(state[n]))
            reply = self._call(lambda r: p.SyncStateRequest(
                r, run or self.run, names, tuple(s.ref for s in staged), revision,
                int(SyncStrategy(strategy))), COLLECTIVE_TIMEOUT)
            for s in staged:
                s.copy_back()
        finally:
            for s in staged:
                s.done()
        return SyncResult(reply.revision, reply.participants, reply.tensors_received,
                          reply.bytes_received, reply.bytes_sent)

    def send(self, peer: str, array: Any, *, tag: str = "p2p", run: str | None = None) -> None:
        """Point-to-point send to a member of the run's view (custom collectives)."""
        staged = self._stage(array)
        try:
            self._call(lambda r: p.SendRequest(r, run or self.run, peer, staged.ref, tag),
                       COLLECTIVE_TIMEOUT)
        finally:
            staged.done()

    def recv(self, peer: str, *, tag: str = "p2p", run: str | None = None) -> np.ndarray:
        """The next array ``peer`` sends with ``tag``. A bfloat16 tensor arrives
        as its bits, uint16 (``torch.from_numpy(a).view(torch.bfloat16)``)."""
        reply = self._call(lambda r: p.RecvRequest(r, run or self.run, peer, tag),
                           COLLECTIVE_TIMEOUT)
        return self._gifted(reply.tensors)[0]

    # ------------------------------------------------------------ DHT and store

    def dht_get(self, key: bytes | str) -> dict[bytes | None, Any]:
        k = key.encode() if isinstance(key, str) else key
        return dict(self._call(lambda r: p.DhtGetRequest(r, k)).values)

    def dht_put(self, key: bytes | str, value: Any, ttl: float = 3600.0) -> int:
        """Store ``value`` under ``key``; returns how many nodes accepted it."""
        k = key.encode() if isinstance(key, str) else key
        return self._call(lambda r: p.DhtPutRequest(r, k, value, ttl)).stored_at

    def store_get(self, doc: str, key: str = "") -> Any:
        """One key of a CRDT map document, or the whole document for ``key=""``."""
        return self._call(lambda r: p.StoreGetRequest(r, doc, key)).value

    def store_set(self, doc: str, key: str, value: Any) -> None:
        self._call(lambda r: p.StoreSetRequest(r, doc, key, value))

    # ------------------------------------------------------------ lifetime

    def _stage(self, array: Any) -> Staged:
        return Staged(self._pool, array, self._copier)

    def close(self) -> None:
        self._conn.close()
        self._pool.close()
        self._copier.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
