"""The in-process node: one UDP socket for QUIC, one TCP listener for data.

``open_node`` is the entry point (an async context manager). A node dials and
accepts authenticated sessions, serves RPC to admitted peers only, opens
encrypted multi-connection data links, and reports ``statistics()``.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio
from aioquic.quic.configuration import QuicConfiguration

from collectives.run import Engine
from crdt.driver import SyncDriver
from crdt.store import Store
from peerd import aead
from peerd.config import NodeConfig, format_address, parse_address
from peerd.datachan import DataConfig
from peerd.datalink import DataLink
from peerd.dataplane import DATA_OPEN_METHOD, DATA_PUNCH_METHOD, DATA_REVERSE_METHOD, DataPlane
from peerd.dht.node import Dht
from peerd.dhtrpc import NodeRpc, serve_dht
from peerd.errors import AuthError, PeerdError, PeerLost, ProtocolError
from peerd.fabric import NodeFabric
from peerd.handshake import new_incarnation
from peerd.identity import Identity, PeerId, SwarmKey
from peerd.log import event
from peerd.natstate import NatState
from peerd.node_runs import RunsMixin
from peerd.quic import IDLE_TIMEOUT, QuicConn, QuicEndpoint
from peerd.rpc import DEFAULT_CALL_TIMEOUT, Handler, RpcRegistry, call_on_stream, serve_stream
from peerd.session import HANDSHAKE_TIMEOUT, Session, client_session, server_session
from peerd.tlscert import private_key_of, self_signed_certificate
from peerd.traversal import Traversal

log = logging.getLogger("peerd.node")

ALPN = "peerd/1"
# Flow-control windows: aioquic's 1 MiB default stalls a fat control stream
# (e.g. the data plane's QUIC fallback) on one round trip per MiB.
QUIC_MAX_DATA = 16 * 1024 * 1024
QUIC_MAX_STREAM_DATA = 4 * 1024 * 1024
# The dialler of a superseded duplicate asks the far end to stop using it, waits
# for the calls on it to end, then closes it (``Node._retire``): how long the
# far end may take to let its calls on it finish before the close cuts them.
RETIRE_TIMEOUT = 60.0
RETIRE_METHOD = "peerd.session.retire"

PeerCallback = Callable[[PeerId], None]

# The session an RPC arrived on, for handlers whose answer depends on it.
CURRENT_SESSION: contextvars.ContextVar[Session] = contextvars.ContextVar("peerd_session")


@dataclass(frozen=True)
class NodeStatistics:
    peer_id: str
    listen: tuple[str, ...]
    peers: int
    pending_handshakes: int
    handshakes_ok: int
    handshakes_failed: int
    rpc_served: int
    rpc_bad: int
    quic_garbage_dropped: int
    quic_pending_cap_dropped: int
    observed_addresses: tuple[str, ...]
    data_port: int
    nat_type: str  # public / easy / hard / unknown, from peers' observations
    confirmed_addresses: tuple[str, ...]
    # (peer short id, "direct" | "punched" | "relay:<relay short id>") per connected peer
    peer_paths: tuple[tuple[str, str], ...] = ()
    # (peer short id, data record cipher) per connected peer
    peer_ciphers: tuple[tuple[str, str], ...] = ()


class Node(RunsMixin):
    """A running node; create it with ``open_node``. Its runs and collectives
    (``join_run``, ``all_reduce``, ``sync_state``, ...) come from ``RunsMixin``."""

    def __init__(self, identity: Identity, swarm_key: SwarmKey, config: NodeConfig,
                 nursery: trio.Nursery, udp: socket.socket) -> None:
        self.identity = identity
        self.incarnation = new_incarnation()  # this process (peerd/handshake.py)
        self.peer_id = identity.peer_id
        self.swarm_key = swarm_key
        self.config = config
        self._nursery = nursery
        self._registry = RpcRegistry()
        self._sessions: dict[PeerId, Session] = {}
        self._slots: dict[PeerId, trio.CapacityLimiter] = {}
        self._spares: dict[PeerId, list[Session]] = {}  # live duplicates, not in use
        self._admitted = trio.Event()  # set (and replaced) at each admission
        self._connected_cbs: list[PeerCallback] = []
        self._lost_cbs: list[PeerCallback] = []
        self._counters = {"handshakes_ok": 0, "handshakes_failed": 0, "rpc_served": 0,
                          "rpc_bad": 0}
        self.observed: dict[PeerId, tuple[str, int]] = {}
        cert = self_signed_certificate(identity)
        key = private_key_of(identity)

        def server_config() -> QuicConfiguration:
            return QuicConfiguration(is_client=False, alpn_protocols=[ALPN], certificate=cert,
                                     private_key=key, idle_timeout=IDLE_TIMEOUT,
                                     max_datagram_size=1350, max_data=QUIC_MAX_DATA,
                                     max_stream_data=QUIC_MAX_STREAM_DATA)

        def client_config() -> QuicConfiguration:
            # Server identity is checked by our handshake against the certificate
            # key, not by a CA, so TLS chain verification is off on purpose.
            return QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                     verify_mode=ssl.CERT_NONE, idle_timeout=IDLE_TIMEOUT,
                                     max_datagram_size=1350, max_data=QUIC_MAX_DATA,
                                     max_stream_data=QUIC_MAX_STREAM_DATA)

        self.endpoint = QuicEndpoint(udp, client_config, server_config, nursery,
                                     self._on_accept, config.max_pending_handshakes)
        self.nat = NatState([self.endpoint.local_address])
        data_config = DataConfig(max_record=config.data_record,
                                 crypto_threads=config.data_threads,
                                 congestion=config.data_congestion,
                                 notsent_lowat=config.data_notsent_lowat)
        self.data = DataPlane(self.peer_id, nursery, self.endpoint.local_address[0],
                              self.call_session, data_config)
        self.register(DATA_OPEN_METHOD, self._handle_data_open)
        self.register(DATA_REVERSE_METHOD, self._handle_data_reverse)
        self.register(DATA_PUNCH_METHOD, self._handle_data_punch)
        self.register(RETIRE_METHOD, self._handle_retire)
        self.traversal = Traversal(self)  # NAT traversal: connect_peer, paths, relaying
        self.on_peer_lost(self.data.peer_lost)
        self.data.on_broken = self._data_link_broken
        self.fabric = NodeFabric(self)
        self.dht = Dht(identity, NodeRpc(self), self.listen_addresses, data_dir=config.data_dir)
        serve_dht(self, self.dht)
        self._dht_joined = False
        self.on_peer_connected(self._dht_learn)
        store_dir = config.data_dir / "crdt" if config.data_dir is not None else None
        self.store = Store.open(store_dir, identity, swarm_key)
        self.store_sync = SyncDriver(self.store, self)
        self._runs: dict[str, tuple[Engine, trio.CancelScope]] = {}

    # ------------------------------------------------------------ addresses

    @property
    def listen_address(self) -> tuple[str, int]:
        return self.endpoint.local_address

    @property
    def listen_addresses(self) -> list[str]:
        return [format_address(self.listen_address)]

    # ------------------------------------------------------------ sessions

    def peers(self) -> list[PeerId]:
        return sorted(p for p in self._sessions if self._live_session(p) is not None)

    def session(self, peer: PeerId) -> Session:
        s = self._live_session(peer)
        if s is None:
            raise PeerLost([peer.text], "not connected")
        return s

    def _live_session(self, peer: PeerId) -> Session | None:
        # The session in use, else a spare: the one in use may just have closed
        # and the survivor not be promoted yet (``_serve_session`` does that).
        # One being retired is used only when there is nothing else.
        in_use = self._sessions.get(peer)
        live = [s for s in [in_use, *reversed(self._spares.get(peer, []))]
                if s is not None and s.alive]
        return next((s for s in live if not s.retiring), live[0] if live else None)

    def peer_at(self, address: str) -> PeerId | None:
        """The connected peer whose packets come from ``address``, if any."""
        for peer, s in self._sessions.items():
            if s.alive and format_address(s.conn.addr) == address:
                return peer
        return None

    def peer_path(self, peer: PeerId) -> str:
        """How ``peer`` is reached: "direct", "punched" (after a coordinated
        hole punch), "relay:<relay short id>", or "none" when not connected."""
        return self.traversal.path(peer)

    async def connect_peer(self, peer: PeerId, timeout: float = 60.0) -> PeerId:
        """Reach ``peer`` by id, choosing the path (direct, punched, relayed)."""
        return await self.traversal.connect_peer(peer, timeout)

    def peer_throughput(self, peer: PeerId) -> float:
        """Best measured data-link throughput to ``peer`` in bytes/s (0: unmeasured)."""
        rates = [engine.link_bandwidth(peer.text) for engine, _ in self._runs.values()]
        return max(rates, default=0.0)

    def on_peer_connected(self, cb: PeerCallback) -> None:
        self._connected_cbs.append(cb)

    def on_peer_lost(self, cb: PeerCallback) -> None:
        self._lost_cbs.append(cb)

    async def connect(self, address: str | tuple[str, int],
                      expect: PeerId | None = None) -> PeerId:
        """Dial ``address``, authenticate both ways, return the peer's id."""
        addr = parse_address(address) if isinstance(address, str) else address
        if expect is not None and expect in self._sessions and self._sessions[expect].alive:
            return expect
        conn = self.endpoint.connect(addr)
        try:
            session = await client_session(conn, self.identity, self.swarm_key, expect,
                                           self.incarnation, self.config.data_ciphers)
        except PeerdError:
            self._counters["handshakes_failed"] += 1
            conn.close()
            raise
        if session.peer == self.peer_id:
            conn.close(0, "self connection")
            raise AuthError(f"{format_address(addr)} is this node itself")
        self._admit(session)
        return session.peer

    def _on_accept(self, conn: QuicConn) -> None:
        self._nursery.start_soon(self._accept, conn)

    async def _accept(self, conn: QuicConn) -> None:
        try:
            session = await server_session(conn, self.identity, self.swarm_key, self.incarnation,
                                           self.config.data_ciphers)
        except PeerdError as exc:
            self._counters["handshakes_failed"] += 1
            event(log, "handshake.rejected", logging.DEBUG, addr=conn.addr_text, error=exc)
            conn.close()
            return
        finally:
            self.endpoint.pending -= 1
        if len(self.peers()) >= self.config.max_peers:
            conn.close(0, "peer limit reached")
            return
        self._admit(session)

    def _admit(self, session: Session) -> None:
        self._counters["handshakes_ok"] += 1
        self._admitted.set()
        self._admitted = trio.Event()
        on_network = self.traversal.admitted(session)  # False for relayed sessions
        if session.observed is not None and on_network:
            self.observed[session.peer] = session.observed
            self.nat.record(session.conn.addr, session.observed, trio.current_time())
        old = self._sessions.get(session.peer)
        if old is not None and old.alive and old.incarnation != session.incarnation:
            self._drop_old_process(session.peer)
            old = None
        if old is not None and old.alive:
            # A network path beats a relayed one. Both sides dialled: keep the
            # session whose dialler has the lower id (both ends agree). One side
            # dialled twice: keep the newer, it dialled again for a reason (it
            # restarted, or saw the older one die before we did).
            keep, drop = self.traversal.prefer(old, session) or (
                (old, session) if old.client_id < session.client_id else (session, old))
            self._sessions[session.peer] = keep
            self._spares.setdefault(session.peer, []).append(drop)
            self._nursery.start_soon(self._serve_session, session)
            # Two sessions dialled by the peer may reach us in another order than
            # they completed there, so only the dialler of the one that goes
            # retires it; the far end serves both until then.
            if drop.initiator:
                self._nursery.start_soon(self._retire, drop)
            return
        self._sessions[session.peer] = session
        self._slots[session.peer] = trio.CapacityLimiter(self.config.rpc.max_concurrent_calls)
        event(log, "peer.connected", peer=session.peer.short, addr=session.conn.addr_text)
        self._nursery.start_soon(self._serve_session, session)
        for cb in self._connected_cbs:
            cb(session.peer)

    def _drop_old_process(self, peer: PeerId) -> None:
        """The peer restarted: its sessions to the old process are dead, however
        the tie rule would rank them, and so is whatever rode on them."""
        for s in [*self._spares.pop(peer, []), self._sessions.pop(peer)]:
            s.conn.close(0, "peer restarted")
        event(log, "peer.restarted", peer=peer.short)
        for cb in self._lost_cbs:
            cb(peer)

    async def _retire(self, session: Session) -> None:
        """Close a duplicate we dialled without cutting off anything on it.

        The far end may still be using it: it may have admitted the two
        sessions in the other order, or not admitted the one we keep yet. So
        we ask it to stop (``_handle_retire``), which it answers once it has
        switched and its own calls on this one have ended; then our calls on
        it end too and we close it. It stays open if it became the one in use
        meanwhile (the other one died)."""
        session.retiring = True
        try:
            await self.call_session(session, RETIRE_METHOD, b"", timeout=RETIRE_TIMEOUT)
        except PeerdError as exc:
            event(log, "peer.retire_unanswered", logging.DEBUG, peer=session.peer.short,
                  error=exc)
        if self._sessions.get(session.peer) is session:
            return
        with trio.move_on_after(RETIRE_TIMEOUT):
            await session.drained()
        # Checked again: the one kept may have died while ours drained, and
        # this one taken its place; closed then, it would cut off the peer.
        if self._sessions.get(session.peer) is not session:
            session.conn.close(0, "duplicate session")

    async def _handle_retire(self, peer: PeerId, payload: bytes) -> bytes:
        """The peer dialled this session and retires it as a duplicate: move
        to the other one (waiting for its admission if it has not reached us
        yet), let our calls on this one end, then answer, so that the close
        that follows cuts off nothing of ours."""
        session = CURRENT_SESSION.get()
        session.retiring = True
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            while (successor := self._live_session(peer)) is session:
                await self._admitted.wait()
        if successor is not None and successor is not session \
                and self._sessions.get(peer) is session:
            spares = self._spares.setdefault(peer, [])
            spares.remove(successor)
            spares.append(session)
            self._sessions[peer] = successor
            event(log, "peer.session_replaced", peer=peer.short, reason="duplicate retired")
        await session.drained()
        return b""

    async def _serve_session(self, session: Session) -> None:
        slots = self._slots.setdefault(
            session.peer, trio.CapacityLimiter(self.config.rpc.max_concurrent_calls))
        async with trio.open_nursery() as nursery:
            async for stream in session.conn.incoming:
                nursery.start_soon(self._serve_stream, stream, session, slots)
        spares = self._spares.get(session.peer, [])
        if session in spares:
            spares.remove(session)
        if self._sessions.get(session.peer) is session:
            if (successor := self._live_session(session.peer)) is not None:
                # A duplicate outlived the session in use: the peer is still here.
                self._sessions[session.peer] = successor
                spares.remove(successor)
                event(log, "peer.session_replaced", peer=session.peer.short,
                      reason=session.conn.close_reason)
                return
            self._spares.pop(session.peer, None)
            del self._sessions[session.peer]
            event(log, "peer.lost", peer=session.peer.short, reason=session.conn.close_reason)
            for cb in self._lost_cbs:
                cb(session.peer)

    async def _serve_stream(self, stream, session: Session,  # type: ignore[no-untyped-def]
                            slots: trio.CapacityLimiter) -> None:
        peer = session.peer
        CURRENT_SESSION.set(session)  # handlers bound to the arrival session read it
        if await self.traversal.take_stream(stream, session):
            return  # a relay circuit or a QUIC data channel, not an RPC
        try:
            await serve_stream(stream, peer, self._registry, self.config.rpc, slots)
            self._counters["rpc_served"] += 1
        except ProtocolError:
            self._counters["rpc_bad"] += 1
        except PeerLost:
            pass  # the caller went away mid-call; nothing to answer

    def disconnect(self, peer: PeerId) -> None:
        for s in [*self._spares.get(peer, []), self._sessions.get(peer)]:
            if s is not None:
                s.conn.close(0, "disconnected")

    # ------------------------------------------------------------ RPC

    def register(self, method: str, handler: Handler) -> None:
        self._registry.register(method, handler)

    def unregister(self, method: str) -> None:
        self._registry.unregister(method)

    async def call_session(self, session: Session, method: str, payload: bytes = b"",
                           timeout: float = DEFAULT_CALL_TIMEOUT, oneway: bool = False) -> bytes:
        """Call over one particular session (its secret keys what the call sets up)."""
        with session.outgoing_call():
            stream = session.conn.open_stream()
            return await call_on_stream(stream, session.peer, method, payload, timeout,
                                        self.config.rpc, oneway=oneway)

    async def call(self, peer: PeerId, method: str, payload: bytes = b"",
                   timeout: float = DEFAULT_CALL_TIMEOUT) -> bytes:
        return await self.call_session(self.session(peer), method, payload, timeout)

    async def notify(self, peer: PeerId, method: str, payload: bytes = b"") -> None:
        """One-way message: no answer, no remote error."""
        await self.call_session(self.session(peer), method, payload, oneway=True)

    # ------------------------------------------------------------ data plane

    async def _handle_data_open(self, peer: PeerId, payload: bytes) -> bytes:
        # Tokens must carry the secret of the session the request came on: while
        # duplicate sessions settle, the two ends may prefer different ones.
        return await self.data.handle_open(CURRENT_SESSION.get(), payload)

    async def _handle_data_reverse(self, peer: PeerId, payload: bytes) -> bytes:
        return await self.data.handle_reverse(CURRENT_SESSION.get(), payload)

    async def _handle_data_punch(self, peer: PeerId, payload: bytes) -> bytes:
        return await self.data.handle_punch(self.session(peer), payload)

    async def open_data_channels(self, peer: PeerId, n: int | None = None,
                                 purpose: str = "user") -> DataLink:
        """Open ``n`` encrypted TCP connections to ``peer`` as one striped link.

        The peer receives the same link from ``accept_data_channels(us, purpose)``.
        """
        n = n or self.config.data_channels
        route = await self.traversal.data_route(peer)
        return await self.data.open_link(self.session(peer), n, purpose, route)

    async def accept_data_channels(self, peer: PeerId, purpose: str = "user") -> DataLink:
        """The link ``peer`` opened to us for ``purpose`` (waits for it)."""
        self.session(peer)  # not connected: PeerLost at once

        def closed() -> trio.Event | None:
            live = self._live_session(peer)
            return live.conn.closed_event if live is not None else None

        return await self.data.inbound(peer, purpose, closed)

    async def data_out(self, peer: PeerId, purpose: str = "fabric") -> DataLink:
        """A cached outbound link for bulk sends, reopened after a failure."""
        return await self.data.outbound(
            peer, purpose, lambda: self.open_data_channels(peer, purpose=purpose))

    def _dht_learn(self, peer: PeerId) -> None:
        """Every authenticated peer is a DHT contact; the first one is our way in."""
        if self.traversal.is_relayed(peer):
            return  # its address is a relay's pipe, useless to anyone else
        addr = format_address(self.session(peer).conn.addr)

        async def learn() -> None:
            with trio.move_on_after(60):
                if self._dht_joined:
                    await self.dht.add_address(addr)
                else:
                    self._dht_joined = True
                    await self.dht.bootstrap([addr])

        self._nursery.start_soon(learn)

    # ------------------------------------------------------------ stats

    def statistics(self) -> NodeStatistics:
        ep = self.endpoint
        return NodeStatistics(
            peer_id=self.peer_id.text,
            listen=tuple(self.listen_addresses),
            peers=len(self.peers()),
            pending_handshakes=ep.pending,
            handshakes_ok=self._counters["handshakes_ok"],
            handshakes_failed=self._counters["handshakes_failed"],
            rpc_served=self._counters["rpc_served"],
            rpc_bad=self._counters["rpc_bad"],
            quic_garbage_dropped=ep.counters["dropped_garbage"],
            quic_pending_cap_dropped=ep.counters["dropped_pending_cap"],
            observed_addresses=tuple(sorted({format_address(a) for a in self.observed.values()})),
            data_port=self.data.port,
            nat_type=self.nat.nat_type(trio.current_time()),
            confirmed_addresses=self.nat.confirmed(trio.current_time()),
            peer_paths=tuple((p.short, self.traversal.path(p)) for p in self.peers()),
            peer_ciphers=tuple((p.short, s.keying.cipher) for p in self.peers()
                               if (s := self._live_session(p)) is not None),
        )

    async def _close(self) -> None:
        spares = [s for group in self._spares.values() for s in group]
        for s in [*self._sessions.values(), *spares]:
            s.conn.close(0, "node shutting down")
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.data.aclose()


def _bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def open_node(
    swarm_key: SwarmKey,
    identity: Identity | None = None,
    listen: str | tuple[str, int] = ("127.0.0.1", 0),
    bootstrap: tuple[str, ...] | list[str] = (),
    config: NodeConfig | None = None,
) -> AsyncIterator[Node]:
    """Run a node for the duration of the ``async with`` block."""
    cfg = config or NodeConfig()
    # The cipher offer is resolved once, here, before anything starts: a bad
    # PEERD_CIPHERS is a plain error, and every handshake offers the same.
    cfg = replace(cfg, data_ciphers=cfg.data_ciphers or aead.supported())
    addr = parse_address(listen, "listen address") if isinstance(listen, str) else listen
    identity = identity or Identity.generate()
    udp = _bind_udp(*addr)
    try:
        async with trio.open_nursery() as nursery:
            node = Node(identity, swarm_key, cfg, nursery, udp)
            nursery.start_soon(node.endpoint.serve)
            nursery.start_soon(node.traversal.infos.run)
            await node.data.start(node.listen_address[1])
            await nursery.start(node.dht.run)
            nursery.start_soon(node.store_sync.run)
            boot = [*bootstrap, *(format_address(a) for a in cfg.bootstrap)]
            for b in boot:
                try:
                    await node.connect(b)
                except PeerdError as exc:
                    event(log, "bootstrap.failed", logging.WARNING, addr=b, error=exc)
            if not boot:
                with trio.move_on_after(30):
                    # Contacts saved by an earlier run are a way back into the DHT.
                    await node.dht.bootstrap(())
            try:
                yield node
            finally:
                await node._close()
                nursery.cancel_scope.cancel()
                node.store.close()
    finally:
        udp.close()
