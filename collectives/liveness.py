"""Liveness of a run's members (mixed into ``collectives.driver.MembershipDriver``).

Heartbeats every member each interval and answers theirs; judges a member
gone by silence past ``heartbeat_timeout``, a dropped connection, a heartbeat
that names this peer as gone, a new process behind its id (its
incarnation), or at once when the transport reports a data connection to it
broken and one heartbeat goes unanswered. Measures links on the way: RTT from
heartbeats, bandwidth from one data probe per peer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from collectives import messages as m
from collectives.fabric import Fabric
from collectives.incarnation import Incarnations
from collectives.membership import Membership
from peerd.errors import PeerLost, ProtocolError, RemoteError, Timeout
from peerd.log import event
from peerd.wire import encode

PROBE_TIMINGS = 2  # timed probe transfers per peer; the fastest counts (see ``_probe``)

if TYPE_CHECKING:
    from collectives.driver import EngineConfig

log = logging.getLogger("collectives.driver")  # one logger for the membership driver


class Liveness:
    """Failure detection and link measurement; see the module doc."""

    fabric: Fabric
    run: str
    me: str
    config: EngineConfig
    core: Membership
    incarnation: int
    _incarnations: Incarnations
    _rtt: dict[str, float]
    _bandwidth: dict[str, float]
    _probing: set[str]
    _seen_connected: set[str]
    _answers: dict[str, float]  # when each peer last answered a call of this peer
    _probe_seq: int

    # Provided by the driver.
    def lost(self, peers: set[str] | frozenset[str], reason: str,
             reported: bool = False) -> frozenset[str]:
        raise NotImplementedError

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        raise NotImplementedError

    def _method(self, name: str) -> str:
        raise NotImplementedError

    def _decode(self, payload: bytes, cls: type[Any]) -> Any:
        raise NotImplementedError

    def _ack(self, peer: str) -> bytes:
        raise NotImplementedError

    def _notify(self) -> None:
        raise NotImplementedError

    def link_broken(self, peer: str) -> None:
        """The transport saw a data connection to ``peer`` end without a close: a
        killed process resets its connections at once, while only silence would
        show it to heartbeats (``heartbeat_timeout``). A stopped process keeps
        its connections, so this never fires for a stall. Check now, with one
        heartbeat that must be answered within the usual call timeout."""
        d = self.core.view
        if (d is not None and self.core.is_member and peer in d.members
                and peer != self.me and peer not in self.core.suspects):
            self._spawn(self._confirm_alive, peer)

    async def _confirm_alive(self, peer: str) -> None:
        try:
            await self._call_heartbeat(peer)
        except (PeerLost, Timeout):
            self.lost({peer}, "its data connection broke and it did not answer a heartbeat")
        except RemoteError:
            pass  # it answers, if not for this run: the regular heartbeat judges that

    async def _heartbeat_loop(self) -> None:
        timing = self.config.timing
        while True:
            if self.core.is_member:
                now = trio.current_time()
                # Only a peer seen connected before can be "disconnected": at
                # start-up members may not have connected yet.
                connected = self.fabric.peers()
                self._seen_connected |= connected
                gone = {p for p in self.core.others() if p in self._seen_connected - connected}
                if gone:
                    self.lost(gone, "disconnected")
                expired = self.core.expired(now)
                if expired:
                    self.lost(expired, f"silent for over {timing.heartbeat_timeout}s")
                for peer in self.core.others():
                    if peer not in self.core.suspects:
                        self._spawn(self._heartbeat, peer)
                        if peer not in self._bandwidth and peer not in self._probing:
                            self._probing.add(peer)
                            self._spawn(self._probe, peer)
                # Without a quorum, keep asking the lost members: the answer
                # that they went on is how a healed partition is noticed.
                for peer in self.core.probes():
                    self._spawn(self._heartbeat, peer)
            await trio.sleep(timing.heartbeat_interval)

    async def call_idempotent(self, peer: str, name: str, payload: bytes,
                              timeout: float) -> bytes:
        """Call this run's method ``name`` on ``peer``, once more on ``PeerLost``:
        for requests that may safely run twice, whose ``PeerLost`` would make
        ``peer`` a suspect. The session under the first call may have died
        while another to the same peer lives (``peerd.node`` retires a
        duplicate only once the calls on it have ended, but gives up waiting
        after ``RETIRE_TIMEOUT``, and a path can fail on its own), which says
        nothing of the peer; the second goes on whatever session is current,
        and fails at once if none is."""
        method = self._method(name)
        try:
            return await self.fabric.call(peer, method, payload, timeout)
        except PeerLost:
            return await self.fabric.call(peer, method, payload, timeout)

    async def _call_heartbeat(self, peer: str) -> bytes:
        """One heartbeat to ``peer``: our revision, suspects and incarnation; its ack."""
        d = self.core.view
        assert d is not None
        msg = m.Heartbeat(self.run, d.revision, tuple(sorted(self.core.suspects)), self.incarnation,
                          tuple(sorted(self.core.observed)))
        return await self.call_idempotent(peer, "hb", encode(msg),
                                          self.config.timing.heartbeat_interval * 2)

    async def _heartbeat(self, peer: str) -> None:
        d = self.core.view
        assert d is not None
        start = trio.current_time()
        try:
            reply = await self._call_heartbeat(peer)
        except PeerLost as exc:
            self.lost({peer}, f"heartbeat: connection lost ({exc})")
            return
        except (Timeout, RemoteError):
            return  # silence is judged by the timeout, not by one late reply
        try:
            ack: m.Ack = self._decode(reply, m.Ack)
        except ProtocolError:
            return
        if self._restarted(peer, ack.incarnation):
            return
        if not ack.member and peer in d.members:
            # Its id answers, but not the process that was a member: it restarted
            # and must join again. Counting this as liveness would leave the run
            # waiting on data the old process will never send.
            self.lost({peer}, f"{peer} restarted (answers without a view of this run)")
            return
        self._answered(peer, ack.revision, excluded=not ack.knows_you)
        if peer in self.core.suspects:
            return  # a probe across a partition: no RTT sample, still suspected
        now = trio.current_time()
        self.core.heard(peer, now)
        rtt = now - start
        self._rtt[peer] = rtt if peer not in self._rtt else 0.8 * self._rtt[peer] + 0.2 * rtt

    def _restarted(self, peer: str, incarnation: int) -> bool:
        """Whether a member's id now answers from a new process; if so the old one
        is lost to this view at once (the new one must join again)."""
        if not self._incarnations.restarted(peer, incarnation):
            return False
        d = self.core.view
        if d is None or peer not in d.members:
            return False
        self.lost({peer}, f"{peer} restarted (a new process with the same identity)")
        return True

    def _answered(self, peer: str, revision: int, excluded: bool = False) -> None:
        """A member answered a heartbeat with its ``revision`` (``excluded``: and
        a view of it that leaves this peer out)."""
        self._answers[peer] = trio.current_time()
        was = self.core.stranded
        if self.core.reported(peer, revision, excluded) and not was:
            d = self.core.view
            event(log, "collectives.stranded", me=self.me, run=self.run,
                  revision=d.revision if d else None, newer=revision, by=peer)
            self._notify()

    async def _probe(self, peer: str) -> None:
        """Estimate the data bandwidth to ``peer`` from timing ``probe_bytes`` to it.

        The first transfer to a peer opens its data link (TCP connections, one
        handshake per channel): a one-byte transfer does that untimed, since
        set-up took longer than 1 MiB takes on any link above ~25 Mbit/s and
        made every link look alike (all read 3-9 MB/s, a 100 Mbit/s one among
        veth links included: tests/lab/test_ring_order_lab.py).

        What a transfer costs besides its bytes (a data message and a probe
        call each way) is measured the same way, with one byte, and taken off;
        the heartbeat RTT taken off before passes through other code and, on a
        busy machine, ran to most of a 1 MiB transfer (a 100 Mbit/s link then
        read above 200). Each timing is the fastest of ``PROBE_TIMINGS``: a
        stall at either end (a garbage collection, a busy core) only ever slows
        a transfer down, and once made a veth link read below a 100 Mbit/s one.
        """
        try:
            await self._transfer(peer, 1)
            bare = full = math.inf
            for _ in range(PROBE_TIMINGS):
                bare = min(bare, await self._timed_transfer(peer, 1))
                full = min(full, await self._timed_transfer(peer, self.config.probe_bytes))
            self._bandwidth[peer] = (self.config.probe_bytes - 1) / max(full - bare, 1e-6)
        except (PeerLost, Timeout, RemoteError):
            pass
        finally:
            self._probing.discard(peer)

    async def _timed_transfer(self, peer: str, n: int) -> float:
        start = trio.current_time()
        await self._transfer(peer, n)
        return trio.current_time() - start

    async def _transfer(self, peer: str, n: int) -> None:
        """Send ``n`` bytes of probe data; returns once ``peer`` has them all."""
        self._probe_seq += 1
        # The incarnation keeps a restarted process's probes apart from any of
        # its predecessor's still undelivered.
        key = f"probe/{self.run}/{self.incarnation:x}/{self._probe_seq}".encode()
        await self.fabric.send_data(peer, key, bytes(n))
        await self.fabric.call(
            peer, self._method("probe"), encode(m.Probe(self.run, key, n)),
            self.config.call_timeout,
        )

    async def _on_heartbeat(self, peer: str, payload: bytes) -> bytes:
        msg: m.Heartbeat = self._decode(payload, m.Heartbeat)
        if self._restarted(peer, msg.incarnation):
            return self._ack(peer)
        d = self.core.view
        now = trio.current_time()
        same_view = d is not None and msg.revision == d.revision and peer in d.members
        if same_view and self.me in msg.observed:
            # The sender found this peer gone itself, so it cannot count on this
            # peer, and this peer must not count on it; a loss it was only told
            # of says nothing about the link between the two (see ``_on_abort``).
            self.lost({peer}, f"{peer} reports this peer gone")
            return self._ack(peer)
        self.core.heard(peer, now)
        if same_view and self.me in msg.suspects:
            # A probe from across a partition: its other suspects are this side
            # of it, alive, and none is taken up.
            return self._ack(peer)
        if self.core.speaks_for_view(peer, msg.revision):
            reported = set(msg.suspects) - {self.me}
            if reported:
                self.lost(reported, f"reported by {peer}", reported=True)
        return self._ack(peer)

    async def _on_probe(self, peer: str, payload: bytes) -> bytes:
        msg: m.Probe = self._decode(payload, m.Probe)
        with trio.fail_after(self.config.call_timeout):
            data = await self.fabric.recv_data(peer, msg.key)
        if len(data) != msg.nbytes:
            raise ProtocolError("probe size mismatch")
        return self._ack(peer)
