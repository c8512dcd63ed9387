"""What the daemon does for each control request: map it onto the node.

``ControlService.handle`` takes one decoded request and the connection it came
on and returns the reply message; ``control.py`` owns the socket. Node
features that the collectives engine, the DHT and the CRDT store add later
(``all_reduce``, ``view``, ``all_gather``, ``sync_state``, ``send``/``recv``,
``dht``, ``store``) are used when the node has them and otherwise answered with
a ``CtlError`` naming the missing feature.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import blake3
import numpy as np
import trio

from collectives.api import Quant, SyncStrategy
from collectives.arrays import Flat, Kind
from collectives.driver import phase_config
from peerd.daemon import protocol as p
from peerd.daemon.shm import Segment, SegmentTable
from peerd.dhtrpc import dht_key
from peerd.errors import ConfigError, PeerdError, ProtocolError
from peerd.identity import PeerId
from peerd.log import event

log = logging.getLogger("peerd.daemon")

FEATURES = ("join_run", "all_reduce", "view", "update_view", "all_gather", "sync_state", "send",
            "recv", "dht", "store")


class Unsupported(PeerdError):
    """The node this daemon runs has no such feature (yet)."""


class Conn(Protocol):
    """What a handler needs from the connection a request came on."""

    table: SegmentTable

    async def gift(self, segment: Segment) -> int: ...


def node_features(node: Any) -> tuple[str, ...]:
    return tuple(f for f in FEATURES if getattr(node, f, None) is not None)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class ControlService:
    """Request handlers over one node; ``counters`` feed status and metrics."""

    def __init__(self, node: Any, clock: Callable[[], float]) -> None:
        self.node = node
        self._clock = clock
        self._started = clock()
        self.counters: Counter[str] = Counter()
        self.runs: set[str] = set()
        # The open connections that took part in each run's collectives
        # (``client_gone``).
        self._held_by: dict[str, set[Conn]] = {}
        self.metrics_address = ""  # set by the daemon once the endpoint is up
        self._handlers: dict[type, Callable[[Any, Conn], Awaitable[Any]]] = {
            p.Hello: self._hello, p.StatusRequest: self._status, p.PeersRequest: self._peers,
            p.ConnectRequest: self._connect, p.EchoRequest: self._echo,
            p.ReleaseSegment: self._release, p.AllReduceRequest: self._all_reduce,
            p.ViewRequest: self._view, p.JoinRunRequest: self._join_run,
            p.LeaveRunRequest: self._leave_run, p.UpdateViewRequest: self._update_view,
            p.AllGatherRequest: self._all_gather,
            p.SyncStateRequest: self._sync_state, p.SendRequest: self._send,
            p.RecvRequest: self._recv, p.DhtGetRequest: self._dht_get,
            p.DhtPutRequest: self._dht_put, p.StoreGetRequest: self._store_get,
            p.StoreSetRequest: self._store_set,
        }

    async def handle(self, msg: Any, conn: Conn) -> Any:
        """The reply to ``msg``; every failure becomes a ``CtlError``."""
        req_id = getattr(msg, "req_id", 0)
        handler = self._handlers.get(type(msg))
        self.counters["requests"] += 1
        try:
            if handler is None:
                raise ProtocolError(f"{type(msg).__name__} is not a request")
            return await handler(msg, conn)
        except PeerdError as exc:
            self.counters["request_errors"] += 1
            return p.CtlError(req_id, type(exc).__name__, str(exc),
                              tuple(getattr(exc, "peers", ())))
        except (ValueError, TypeError) as exc:
            # Raised by node features on invalid input (shape mismatch, bad key).
            self.counters["request_errors"] += 1
            return p.CtlError(req_id, "ConfigError", str(exc), ())
        except Exception as exc:
            # A bug, in peerd or below it. Raised on, it would end the control
            # server and so every client's connection; this request fails alone
            # and the log keeps the traceback. (Cancellation is a BaseException
            # and passes.)
            self.counters["request_errors"] += 1
            log.error("request %s failed", type(msg).__name__, exc_info=True)
            return p.CtlError(req_id, "InternalError",
                              f"the daemon failed on {type(msg).__name__} ({type(exc).__name__}: "
                              f"{exc}); this is a bug in peerd: please report it with the "
                              "daemon's log, which has the traceback", ())

    def _feature(self, name: str) -> Any:
        value = getattr(self.node, name, None)
        if value is None:
            raise Unsupported(f"this daemon's node has no {name} support yet")
        return value

    # ------------------------------------------------------------ status

    async def _hello(self, msg: p.Hello, conn: Conn) -> p.HelloReply:
        if msg.version != p.CONTROL_VERSION:
            raise ProtocolError(f"client speaks control version {msg.version}, "
                                f"daemon speaks {p.CONTROL_VERSION}; upgrade one of them")
        return p.HelloReply(msg.req_id, p.CONTROL_VERSION, self.node.peer_id.text,
                            node_features(self.node))

    def peer_infos(self) -> tuple[p.PeerInfo, ...]:
        node = self.node
        out = []
        path_of = getattr(node, "peer_path", None)
        throughput_of = getattr(node, "peer_throughput", None)
        for peer in node.peers():
            try:
                session = node.session(peer)
            except PeerdError:
                continue
            observed = node.observed.get(peer)
            out.append(p.PeerInfo(
                peer_id=peer.text, address=session.conn.addr_text,
                path=str(path_of(peer)) if path_of else "quic",
                observed=f"{observed[0]}:{observed[1]}" if observed else "",
                throughput_bps=float(throughput_of(peer) or 0.0) if throughput_of else 0.0,
                cipher=session.keying.cipher,
            ))
        return tuple(out)

    def status(self, req_id: int = 0) -> p.StatusReply:
        node = self.node
        stats = node.statistics()
        counters = {k: int(v) for k, v in vars(stats).items()
                    if isinstance(v, int) and not isinstance(v, bool)}
        counters.update(self.counters)
        runs = getattr(node, "runs", None)
        run_names = set(self.runs) | set(runs() if callable(runs) else ())
        return p.StatusReply(
            req_id=req_id, peer_id=node.peer_id.text, pid=os.getpid(),
            uptime_s=self._clock() - self._started,
            listen=tuple(node.listen_addresses),
            observed=tuple(getattr(stats, "observed_addresses", ())),
            nat=str(getattr(stats, "nat_type", "") or getattr(node, "nat_type", "") or ""),
            peers=self.peer_infos(), runs=tuple(sorted(run_names)), counters=counters,
            metrics=self.metrics_address, swarm=node.swarm_key.fingerprint,
        )

    async def _status(self, msg: p.StatusRequest, conn: Conn) -> p.StatusReply:
        return self.status(msg.req_id)

    async def _peers(self, msg: p.PeersRequest, conn: Conn) -> p.PeersReply:
        return p.PeersReply(msg.req_id, self.peer_infos())

    async def _connect(self, msg: p.ConnectRequest, conn: Conn) -> p.ConnectReply:
        peer = await self.node.connect(msg.address)
        return p.ConnectReply(msg.req_id, peer.text)

    # ------------------------------------------------------------ tensors

    async def _echo(self, msg: p.EchoRequest, conn: Conn) -> p.EchoReply:
        arr = conn.table.array(msg.tensor)
        flat = arr.reshape(-1).view(np.uint8)
        if msg.mode == 1:
            digest = await trio.to_thread.run_sync(lambda: blake3.blake3(flat.data).digest())
            return p.EchoReply(msg.req_id, digest)
        if msg.mode == 2:
            await trio.to_thread.run_sync(lambda: np.bitwise_xor(flat, 0x80, out=flat))
        elif msg.mode != 0:
            raise ProtocolError(f"unknown echo mode {msg.mode}")
        return p.EchoReply(msg.req_id, b"")

    async def _release(self, msg: p.ReleaseSegment, conn: Conn) -> p.Ok:
        conn.table.release(msg.segment)
        return p.Ok(msg.req_id)

    async def _all_reduce(self, msg: p.AllReduceRequest, conn: Conn) -> p.AllReduceReply:
        all_reduce = self._feature("all_reduce")
        if msg.op not in ("avg", "sum"):
            raise ProtocolError(f"unknown reduce op {msg.op!r}")
        arr = _reducible(conn.table.array(msg.tensor), msg.tensor)
        out = _reducible(conn.table.array(msg.out), msg.out) if msg.out is not None else None
        self.runs.add(msg.run)
        self._take_part(msg.run, conn)
        try:
            res = await all_reduce(msg.run, arr, msg.op, tag=msg.tag, quant=Quant(msg.quant),
                                   retry=msg.retry, out=out)
        except PeerdError as exc:
            self.counters["all_reduce_failed"] += 1
            event(log, "all_reduce.failed", logging.WARNING, run=msg.run, tag=msg.tag, error=exc)
            raise
        self.counters["all_reduce_ok"] += 1
        self.counters["all_reduce_bytes_sent"] += res.bytes_sent
        self.counters["all_reduce_bytes_received"] += res.bytes_received
        return p.AllReduceReply(msg.req_id, tuple(res.participants), res.revision,
                                res.bytes_sent, res.bytes_received, res.seconds, res.attempts)

    async def _view(self, msg: p.ViewRequest, conn: Conn) -> p.ViewReply:
        v = await _maybe_await(self._feature("view")(msg.run))
        self.runs.add(msg.run)
        return _view_reply(msg.req_id, v)

    async def _join_run(self, msg: p.JoinRunRequest, conn: Conn) -> p.ViewReply:
        join_run = self._feature("join_run")
        members = list(msg.members) if msg.members is not None else None
        if msg.phase_timeout is None:
            await join_run(msg.run, members, timeout=msg.timeout)
        else:
            await join_run(msg.run, members, config=phase_config(msg.phase_timeout),
                           timeout=msg.timeout)
        self.runs.add(msg.run)
        return await self._view(p.ViewRequest(msg.req_id, msg.run), conn)

    async def _update_view(self, msg: p.UpdateViewRequest, conn: Conn) -> p.ViewReply:
        self._take_part(msg.run, conn)
        v = await self._feature("update_view")(msg.run)
        return _view_reply(msg.req_id, v)

    async def _leave_run(self, msg: p.LeaveRunRequest, conn: Conn) -> p.Ok:
        self._held_by.pop(msg.run, None)
        await self._feature("leave_run")(msg.run)
        self.runs.discard(msg.run)
        return p.Ok(msg.req_id)

    def _take_part(self, run: str, conn: Conn) -> None:
        self._held_by.setdefault(run, set()).add(conn)

    async def client_gone(self, conn: Conn) -> None:
        """``conn`` closed (its process ended, crashed or was killed): leave the
        runs whose collectives it took part in, unless another open
        connection takes part too.

        Left in, this daemon would stay a member that never contributes again:
        every other member's next round would wait out its phase deadline
        (30 s, plus minutes for a large tensor) before going on without it. A
        leave is taken up at once, and the training process, restarted, joins
        again like any newcomer. Joining alone does not count: a launcher may
        join on the trainers' behalf and close (``peerd demo`` does).
        """
        for run in [r for r, conns in self._held_by.items() if conn in conns]:
            conns = self._held_by[run]
            conns.discard(conn)
            if conns:
                continue
            del self._held_by[run]
            runs = getattr(self.node, "runs", None)
            if callable(runs) and run not in runs():
                continue  # its calls failed: this node never was in it, or left it
            event(log, "daemon.left_run", run=run,
                  reason="the client that took part in it went away without leaving")
            try:
                await self._feature("leave_run")(run)
            except Exception:  # raised on, it would end the control server
                log.error("leaving run %r failed", run, exc_info=True)
            self.runs.discard(run)

    async def _gift_arrays(self, arrays: list[np.ndarray], conn: Conn) -> tuple[p.TensorRef, ...]:
        """Copy ``arrays`` into one new segment owned by the client."""
        offsets, total = [], 0
        for a in arrays:
            total = -(-total // 16) * 16  # keep every array 16-byte aligned
            offsets.append(total)
            total += a.nbytes
        seg = Segment.create(total, "peerd-result")
        try:
            for a, off in zip(arrays, offsets, strict=True):
                view = np.frombuffer(seg.mapping, dtype=a.dtype, count=a.size, offset=off)
                view[...] = a.reshape(-1)
                del view
            seg_id = await conn.gift(seg)
        finally:
            seg.close()
        return tuple(p.TensorRef(seg_id, off, a.dtype.str, tuple(a.shape))
                     for a, off in zip(arrays, offsets, strict=True))

    async def _all_gather(self, msg: p.AllGatherRequest, conn: Conn) -> p.TensorsReply:
        all_gather = self._feature("all_gather")
        arr = conn.table.array(msg.tensor)
        self.runs.add(msg.run)
        self._take_part(msg.run, conn)
        arrays, peers = await all_gather(msg.run, arr, tag=msg.tag, retry=msg.retry)
        refs = await self._gift_arrays([np.asarray(a) for a in arrays], conn)
        return p.TensorsReply(msg.req_id, refs, tuple(peers))

    async def _sync_state(self, msg: p.SyncStateRequest, conn: Conn) -> p.SyncStateReply:
        sync_state = self._feature("sync_state")
        if len(msg.names) != len(msg.tensors) or len(set(msg.names)) != len(msg.names):
            raise ProtocolError("sync_state needs one unique name per tensor")
        state = {n: conn.table.array(t) for n, t in zip(msg.names, msg.tensors, strict=True)}
        self.runs.add(msg.run)
        self._take_part(msg.run, conn)
        res = await sync_state(msg.run, state, msg.revision, SyncStrategy(msg.strategy))
        return p.SyncStateReply(msg.req_id, res.revision, tuple(res.participants),
                                tuple(res.tensors_received), res.bytes_received, res.bytes_sent)

    async def _send(self, msg: p.SendRequest, conn: Conn) -> p.Ok:
        send = self._feature("send")
        self._take_part(msg.run, conn)
        await send(msg.run, _peer(msg.peer), conn.table.array(msg.tensor), tag=msg.tag)
        return p.Ok(msg.req_id)

    async def _recv(self, msg: p.RecvRequest, conn: Conn) -> p.TensorsReply:
        recv = self._feature("recv")
        self._take_part(msg.run, conn)
        arr = np.asarray(await recv(msg.run, _peer(msg.peer), tag=msg.tag))
        return p.TensorsReply(msg.req_id, await self._gift_arrays([arr], conn), (msg.peer,))

    # ------------------------------------------------------------ DHT and store

    async def _dht_get(self, msg: p.DhtGetRequest, conn: Conn) -> p.DhtGetReply:
        values = await self._feature("dht").get(dht_key(msg.key))
        return p.DhtGetReply(msg.req_id, tuple(values.items()))

    async def _dht_put(self, msg: p.DhtPutRequest, conn: Conn) -> p.DhtPutReply:
        try:
            stored = await self._feature("dht").put(dht_key(msg.key), msg.value, msg.ttl)
        except ValueError as exc:  # the DHT's own limits (size, ttl): the user's to fix
            raise ConfigError(f"dht put refused: {exc}") from None
        return p.DhtPutReply(msg.req_id, int(stored))

    async def _store_get(self, msg: p.StoreGetRequest, conn: Conn) -> p.StoreGetReply:
        doc = self._feature("store").doc(msg.doc)
        return p.StoreGetReply(msg.req_id, doc.to_dict() if msg.key == "" else doc.get(msg.key))

    async def _store_set(self, msg: p.StoreSetRequest, conn: Conn) -> p.Ok:
        self._feature("store").doc(msg.doc).set(msg.key, msg.value)
        return p.Ok(msg.req_id)


def _view_reply(req_id: int, v: Any) -> p.ViewReply:
    return p.ViewReply(req_id, v.run, v.revision, tuple(v.members), v.me)


def _peer(text: str) -> PeerId:
    try:
        return PeerId.parse(text)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _reducible(arr: np.ndarray, ref: p.TensorRef) -> np.ndarray | Flat:
    """What the node reduces for ``ref``: the array itself, or for bfloat16
    (which numpy lacks) its bits marked as bfloat16."""
    return Flat(arr.reshape(-1), Kind.BF16) if ref.dtype == p.BF16_DTYPE else arr
