"""How a node reaches a peer by id: direct, hole-punched, or relayed.

``Traversal.connect_peer`` learns the target's ``NatInfo`` through a common
peer (``peerd.nat_punch`` signalling), or from the DHT when no common peer
knows the target, plans with the pure ``nat.strategy.plan_paths`` and tries
the attempts in order: dial a known address (LAN addresses first when both
sit behind one NAT), ask the target to dial us, a coordinated UDP punch
followed by a QUIC dial from the node's one socket, and, last, a relayed
session through a common peer (``peerd.nat_relay``). Every session carries a
truthful path label: ``direct``, ``punched`` or ``relay:<relay short id>``.

A relayed session is upgraded when a later punch works (the node keeps the
non-relayed duplicate and retires the relayed one after a grace period), and
is re-established through another relay when its relay goes away.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from nat.endpoint import Endpoint, NatType
from nat.relay import RelayStats
from nat.strategy import PathAttempt, PathKind, plan_paths
from peerd.config import format_address
from peerd.errors import ConfigError, PeerdError, PeerLost, ProtocolError, Timeout
from peerd.identity import PeerId
from peerd.log import event
from peerd.nat_data import QDATA_MAGIC
from peerd.nat_info import INFO_TIMEOUT, PeerInfos
from peerd.nat_pipe import PipeEndpoint
from peerd.nat_punch import (
    FORWARD_METHOD,
    SIGNAL_METHOD,
    InfoRequest,
    PunchCoordinator,
    ReverseDial,
)
from peerd.nat_relay import CIRCUIT_MAGIC, RELAY_MAGIC, RelayService, open_circuit, read_header
from peerd.natstate import NatInfo
from peerd.quic import QuicConn, QuicStream
from peerd.session import HANDSHAKE_TIMEOUT, Session, client_session, server_session

if TYPE_CHECKING:
    from peerd.node import Node

log = logging.getLogger("peerd.traversal")

DIRECT = "direct"
PUNCHED = "punched"
RELAY_PREFIX = "relay:"
DIRECT_TIMEOUT = 3.0  # a dial that has not completed its handshake by then is filtered
REVERSE_TIMEOUT = 8.0
PEEK_TIMEOUT = 10.0
RESPONDED_RECENTLY = 30.0  # an inbound session this soon after our punch burst is punched
RENDEZVOUS_TRIES = 3
UPGRADE_DELAYS = (30.0, 60.0, 120.0)
RECONNECT_DELAYS = (0.5, 2.0, 5.0)
_NON_RELAY = (PathKind.DIRECT_PRIVATE, PathKind.DIRECT_PUBLIC, PathKind.REVERSE,
              PathKind.PUNCH, PathKind.PUNCH_PREDICTED)


@dataclass(frozen=True)
class TraversalStats:
    peer_paths: tuple[tuple[str, str], ...]  # (peer short id, path) per connected peer
    nat: NatInfo
    punches_ok: int
    punches_failed: int
    probes_sent: int
    relayed_peers: int
    relay: RelayStats  # circuits this node carries for others
    data_routes: tuple[tuple[str, int], ...]


class Traversal:
    """Path selection and NAT traversal for one node (built by the node)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._labels: weakref.WeakKeyDictionary[QuicConn, str] = weakref.WeakKeyDictionary()
        self._wanted: set[PeerId] = set()
        self._relay_of: dict[PeerId, PeerId] = {}
        self._arrived: dict[PeerId, trio.Event] = {}
        self._locks: dict[PeerId, trio.Lock] = {}
        self.infos = PeerInfos(node)
        self.relay = RelayService(node._sessions)
        self.punch = PunchCoordinator(node.peer_id, node.call, node.endpoint.send_raw,
                                      self.local_info, self._reverse_dial, node._nursery)
        node.endpoint.set_raw_handler(self.punch.on_raw)
        node.register(FORWARD_METHOD, self.punch.handle_forward)
        node.register(SIGNAL_METHOD, self.punch.handle_signal)
        node.on_peer_lost(self._on_lost)

    def local_info(self) -> NatInfo:
        return self.infos.local()

    # ------------------------------------------------------------ hooks from the node

    def admitted(self, session: Session) -> bool:
        """A session is about to be admitted; returns whether its handshake
        observation describes our real network path (not a relay's pipe)."""
        peer, conn = session.peer, session.conn
        ev = self._arrived.pop(peer, None)
        if ev is not None:
            ev.set()
        if self.is_relayed_conn(conn):
            return False
        self._relay_of.pop(peer, None)
        responded = self.punch.responded_at.get(peer)
        if responded is not None and trio.current_time() - responded < RESPONDED_RECENTLY:
            self._labels.setdefault(conn, PUNCHED)
        self.infos.changed()
        return True

    def prefer(self, old: Session, new: Session) -> tuple[Session, Session] | None:
        """(keep, drop) between two live sessions with one peer, or None for the
        node's tie rule (which also covers two relayed sessions: the newer of
        two dialled by one side wins, e.g. after its relay left). A network
        path beats a relayed one."""
        old_r, new_r = self.is_relayed_conn(old.conn), self.is_relayed_conn(new.conn)
        if old_r != new_r:
            return (new, old) if old_r else (old, new)
        return None

    def is_relayed_conn(self, conn: QuicConn) -> bool:
        return self._labels.get(conn, DIRECT).startswith(RELAY_PREFIX)

    def is_relayed(self, peer: PeerId) -> bool:
        s = self._node._sessions.get(peer)
        return s is not None and self.is_relayed_conn(s.conn)

    def path(self, peer: PeerId) -> str:
        s = self._node._sessions.get(peer)
        if s is None or not s.alive:
            return "none"
        return self._labels.get(s.conn, DIRECT)

    async def take_stream(self, stream: QuicStream, session: Session) -> bool:
        """Handle ``stream`` if it is a relay or QUIC data stream (True), else
        leave it unread for RPC (False)."""
        try:
            with trio.fail_after(PEEK_TIMEOUT):
                head = await stream.peek(len(RELAY_MAGIC))
        except (trio.TooSlowError, PeerdError):
            return False
        if head == QDATA_MAGIC:
            await self._node.data.take_quic_stream(stream, session)
            return True
        if head not in (RELAY_MAGIC, CIRCUIT_MAGIC):
            return False
        try:
            if self.is_relayed_conn(session.conn):
                raise ProtocolError("no relay chains: relay requests must use a network path")
            magic, peer = await read_header(stream)
            if magic == RELAY_MAGIC:
                await self.relay.serve(stream, session.peer, peer)
            else:
                await self._accept_circuit(stream, session.peer, peer)
        except (PeerdError, trio.TooSlowError) as exc:
            event(log, "relay.stream_refused", logging.DEBUG, peer=session.peer.short, error=exc)
            stream.reset()
        return True

    def _on_lost(self, peer: PeerId) -> None:
        relay = self._relay_of.pop(peer, None)
        if relay is not None and peer in self._wanted:
            self._node._nursery.start_soon(self._reconnect, peer, relay)

    # ------------------------------------------------------------ connecting

    async def connect_peer(self, peer: PeerId, timeout: float = 60.0) -> PeerId:
        if peer == self._node.peer_id:
            raise ConfigError("connect_peer: that is this node's own id")
        self._wanted.add(peer)
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:
            if self.path(peer) != "none":
                return peer
            try:
                with trio.fail_after(timeout):
                    return await self._establish(peer, set())
            except trio.TooSlowError:
                raise Timeout(f"no path to {peer.short} within {timeout:g}s") from None

    async def _establish(self, peer: PeerId, exclude: set[PeerId]) -> PeerId:
        rendezvous = self._rendezvous(peer, exclude)
        info, via = await self._remote_info(peer, rendezvous)
        local = self.local_info()
        plan = plan_paths(local.peer_info(), info.peer_info(), relay_available=bool(rendezvous))
        if info.nat_type is NatType.UNKNOWN and info.private and info.public_ip is None:
            # Unclassified (e.g. on loopback or a LAN only): its own addresses may just work.
            plan = (PathAttempt(PathKind.DIRECT_PRIVATE, info.private), *plan)
        errors: list[str] = []
        for attempt in plan:
            try:
                await self._attempt(attempt, peer, via, rendezvous)
            except (PeerdError, trio.TooSlowError) as exc:
                errors.append(f"{attempt.kind.value}: {exc}")
                continue
            event(log, "traversal.connected", peer=peer.short, path=self.path(peer),
                  attempt=attempt.kind.value, failed=errors)
            if attempt.kind is PathKind.RELAY and any(a.kind in _NON_RELAY for a in plan):
                self._node._nursery.start_soon(self._upgrade_later, peer)
            return peer
        raise PeerLost([peer.text], "no path: " + ("; ".join(errors) or "nothing to try"))

    def _rendezvous(self, peer: PeerId, exclude: set[PeerId]) -> list[PeerId]:
        """Connected peers that may know ``peer``: network paths only, public first."""
        out = []
        for p in self._node.peers():
            s = self._node._sessions.get(p)
            if p == peer or p in exclude or s is None or self.is_relayed_conn(s.conn):
                continue
            out.append((_is_lan(s.conn.addr), p.text, p))
        return [p for *_, p in sorted(out)]

    async def _remote_info(self, peer: PeerId,
                           rendezvous: list[PeerId]) -> tuple[NatInfo, PeerId | None]:
        for r in rendezvous[:RENDEZVOUS_TRIES]:
            try:
                with trio.fail_after(INFO_TIMEOUT):
                    reply = await self.punch.via(r, peer, InfoRequest(1))
            except (PeerdError, trio.TooSlowError):
                continue
            if isinstance(reply, NatInfo):
                self.infos.remember(peer, reply)
                return reply, r
        return await self.infos.from_dht(peer), None

    async def _attempt(self, attempt: PathAttempt, peer: PeerId, via: PeerId | None,
                       rendezvous: list[PeerId]) -> None:
        kind = attempt.kind
        if kind in (PathKind.DIRECT_PRIVATE, PathKind.DIRECT_PUBLIC):
            errors = []
            for target in attempt.targets:
                try:
                    await self._dial(target.as_tuple(), peer, DIRECT)
                    return
                except (PeerdError, trio.TooSlowError) as exc:
                    errors.append(f"{target}: {exc}")
            raise PeerLost([peer.text], "; ".join(errors) or "no address")
        if kind is PathKind.RELAY:
            for r in rendezvous:
                try:
                    await self._relay(r, peer)
                    return
                except PeerdError as exc:
                    event(log, "relay.failed", relay=r.short, peer=peer.short, error=exc)
            raise PeerLost([peer.text], "no relay reached the peer")
        if kind is PathKind.BIRTHDAY:
            raise PeerLost([peer.text], "birthday probing is not run by the node")
        if via is None:
            raise PeerLost([peer.text], "no common peer to coordinate through")
        if kind is PathKind.REVERSE:
            arrived = self._arrived.setdefault(peer, trio.Event())
            local = self.local_info()
            await self.punch.via(via, peer, ReverseDial((*local.public, *local.private)[:8]))
            with trio.fail_after(REVERSE_TIMEOUT):
                await arrived.wait()
            return
        outcome = await self.punch.punch(via, peer)
        if not outcome.succeeded or outcome.remote is None:
            raise PeerLost([peer.text], "punch failed: " + "; ".join(outcome.failures))
        await self._dial(outcome.remote.as_tuple(), peer, PUNCHED)

    async def _dial(self, addr: tuple[str, int], peer: PeerId, label: str,
                    timeout: float = DIRECT_TIMEOUT) -> None:
        node = self._node
        conn = node.endpoint.connect(addr)
        self._labels[conn] = label
        try:
            with trio.fail_after(timeout):
                session = await client_session(conn, node.identity, node.swarm_key, peer,
                                               node.incarnation)
        except trio.TooSlowError:
            conn.close()
            raise Timeout(f"{format_address(addr)} did not answer within {timeout:g}s") from None
        except BaseException:
            conn.close()
            raise
        node._admit(session)

    async def relay_to(self, peer: PeerId, relay: PeerId) -> None:
        """A relayed session with ``peer`` through ``relay``, whatever else
        exists (tests and operators; ``connect_peer`` picks relays itself)."""
        self._wanted.add(peer)
        await self._relay(relay, peer)

    async def _relay(self, relay: PeerId, peer: PeerId) -> None:
        node = self._node
        stream = await open_circuit(node.session(relay), peer)
        pipe = PipeEndpoint(stream, ("", 0))
        conn = pipe.start_client(node._nursery, node.endpoint.client_configuration())
        self._labels[conn] = RELAY_PREFIX + relay.short
        try:
            session = await client_session(conn, node.identity, node.swarm_key, peer,
                                           node.incarnation)
        except BaseException:
            conn.close()
            raise
        self._relay_of[peer] = relay
        node._admit(session)

    async def _accept_circuit(self, stream: QuicStream, relay: PeerId, claimed: PeerId) -> None:
        node = self._node
        pipe = PipeEndpoint(stream, ("", 0))
        conn = await pipe.start_server(node._nursery, node.endpoint.server_configuration())
        self._labels[conn] = RELAY_PREFIX + relay.short
        with trio.fail_after(HANDSHAKE_TIMEOUT + 1):
            session = await server_session(conn, node.identity, node.swarm_key, node.incarnation)
        if session.peer != claimed:
            conn.close(0, "relay named another peer")
            raise ProtocolError(f"relay {relay.short} named {claimed.short}, "
                                f"circuit came from {session.peer.short}")
        self._relay_of[session.peer] = relay
        node._admit(session)

    async def _reverse_dial(self, source: PeerId, candidates: tuple[Endpoint, ...]) -> None:
        """``source`` asked us to dial it (it is reachable, we are not)."""
        for target in candidates:
            if self.path(source) not in ("none",) and not self.is_relayed(source):
                return
            try:
                await self._dial(target.as_tuple(), source, DIRECT)
                return
            except (PeerdError, trio.TooSlowError):
                continue

    async def _reconnect(self, peer: PeerId, dead_relay: PeerId) -> None:
        for delay in RECONNECT_DELAYS:
            await trio.sleep(delay)
            if self.path(peer) != "none":
                return
            try:
                await self._establish(peer, {dead_relay})
                return
            except PeerdError as exc:
                event(log, "traversal.reconnect_failed", peer=peer.short, error=exc)

    async def try_upgrade(self, peer: PeerId) -> str:
        """One more round of the non-relay attempts for a relayed peer; the path after."""
        if not self.is_relayed(peer):
            return self.path(peer)
        relay = self._relay_of.get(peer)
        rendezvous = self._rendezvous(peer, set())
        info, via = await self._remote_info(peer, rendezvous)
        plan = plan_paths(self.local_info().peer_info(), info.peer_info(), relay_available=False)
        for attempt in plan:
            if attempt.kind in _NON_RELAY:
                try:
                    await self._attempt(attempt, peer, via, rendezvous)
                    break
                except (PeerdError, trio.TooSlowError):
                    continue
        event(log, "traversal.upgrade", peer=peer.short, path=self.path(peer),
              relay=relay.short if relay else None)
        return self.path(peer)

    async def _upgrade_later(self, peer: PeerId) -> None:
        for delay in UPGRADE_DELAYS:
            await trio.sleep(delay)
            if not self.is_relayed(peer):
                return
            await self.try_upgrade(peer)

    # ------------------------------------------------------------ data routes, statistics

    async def data_route(self, peer: PeerId) -> str:
        """How the data plane should open a link to ``peer`` (``dataplane.ROUTES``)."""
        s = self._node.session(peer)
        label = self._labels.get(s.conn, DIRECT)
        if label.startswith(RELAY_PREFIX):
            return "quic"
        info = await self.infos.of(peer)
        local = self.local_info()
        if label == PUNCHED:
            return "punch" if info.port_preserving and local.port_preserving else "quic"
        if _is_lan(s.conn.addr) or info.nat_type is NatType.PUBLIC:
            return "direct"
        if local.nat_type is NatType.PUBLIC and info.nat_type in (NatType.EASY, NatType.HARD):
            return "reverse"
        return "direct"

    def statistics(self) -> TraversalStats:
        node = self._node
        c = self.punch.counters
        return TraversalStats(
            peer_paths=tuple((p.short, self.path(p)) for p in node.peers()),
            nat=self.local_info(),
            punches_ok=c["punches_ok"],
            punches_failed=c["punches_failed"],
            probes_sent=c["probes_sent"],
            relayed_peers=sum(self.is_relayed(p) for p in node.peers()),
            relay=self.relay.core.statistics(),
            data_routes=tuple(sorted(node.data.routes_used.items())),
        )


def _is_lan(addr: tuple[str, int]) -> bool:
    try:
        return Endpoint(addr[0], max(addr[1], 1)).is_lan
    except ValueError:
        return False
