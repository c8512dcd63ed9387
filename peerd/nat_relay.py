"""Relayed sessions: a common peer splices two QUIC streams into a circuit.

Peer A opens a stream to relay R starting with ``RELAY_MAGIC | B's id``. R
asks its ``nat.relay.Relay`` core for a circuit, opens a stream to B starting
with ``RELAY_MAGIC | A's id``, answers A with one status byte and then copies
bytes both ways, pacing each chunk by the core's verdict. A and B run an
ordinary QUIC connection and peerd handshake over the circuit
(``peerd.nat_pipe``), so R forwards only ciphertext and cannot impersonate
either end: the handshake binds both peer ids to the end-to-end channel.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from nat.relay import Forward, Opened, Relay, RelayLimits
from peerd.errors import PeerLost, ProtocolError
from peerd.identity import PEER_ID_BYTES, PeerId
from peerd.log import event
from peerd.quic import QuicStream
from peerd.session import Session

log = logging.getLogger("peerd.relay")

# As frame lengths these are > 4 GB, so they never start a valid RPC stream.
RELAY_MAGIC = b"\xffpdR"  # A -> R: "relay me to this peer"
CIRCUIT_MAGIC = b"\xffpdC"  # R -> B: "a circuit from this peer"
OPEN_TIMEOUT = 10.0
STATUS_OK = b"\x01"
STATUS_REFUSED = b"\x00"
# Per-relay limits for circuits this node carries for others (nat.relay's
# defaults are sized for volunteers' uplinks; these let lab and LAN relays
# move a few MB/s while still bounding what a node spends on strangers' pairs).
NODE_RELAY_LIMITS = RelayLimits(max_circuits=32, max_circuits_per_peer=8,
                                circuit_rate=4 * 1024 * 1024, circuit_burst=512 * 1024,
                                total_rate=16 * 1024 * 1024, total_burst=1024 * 1024)


class RelayService:
    """This node relaying for its peers; ``serve`` runs one circuit."""

    def __init__(self, sessions: dict[PeerId, Session],
                 limits: RelayLimits = NODE_RELAY_LIMITS) -> None:
        self._sessions = sessions
        self.core = Relay(limits, trio.current_time())

    async def serve(self, stream: QuicStream, source: PeerId, target: PeerId) -> None:
        """Carry a circuit from ``source`` (who opened ``stream``) to ``target``."""
        session = self._sessions.get(target)
        if session is None or not session.alive:
            await _refuse(stream, "relay is not connected to the target")
            return
        verdict = self.core.open(source.text, target.text, trio.current_time())
        if not isinstance(verdict, Opened):
            await _refuse(stream, verdict.reason.value)
            return
        cid = verdict.circuit
        out: QuicStream | None = None
        try:
            out = session.conn.open_stream()
            await out.send(CIRCUIT_MAGIC + source.raw)
            await stream.send(STATUS_OK)
            event(log, "relay.circuit_open", a=source.short, b=target.short, circuit=cid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, cid, stream, out, nursery.cancel_scope)
                nursery.start_soon(self._copy, cid, out, stream, nursery.cancel_scope)
        except PeerLost:
            pass  # either end went away: the circuit ends with it
        finally:
            self.core.close(cid)
            stream.reset()
            if out is not None:
                out.reset()
            event(log, "relay.circuit_closed", a=source.short, b=target.short, circuit=cid)

    async def _copy(self, cid: int, src: QuicStream, dst: QuicStream,
                    scope: trio.CancelScope) -> None:
        try:
            while chunk := await src.receive_some():
                verdict = self.core.forward(cid, len(chunk), trio.current_time())
                if not isinstance(verdict, Forward):
                    return  # refused: lifetime or byte cap reached
                if verdict.delay > 0:
                    await trio.sleep(verdict.delay)
                await dst.send(chunk)
        except PeerLost:
            pass
        finally:
            scope.cancel()


async def _refuse(stream: QuicStream, reason: str) -> None:
    body = reason.encode()[:255]
    with contextlib.suppress(PeerLost):
        await stream.send(STATUS_REFUSED + bytes([len(body)]) + body, end=True)


async def open_circuit(session: Session, target: PeerId) -> QuicStream:
    """A circuit to ``target`` through the peer of ``session``; ``PeerLost``
    when the relay refuses or cannot reach the target."""
    stream = session.conn.open_stream()
    try:
        await stream.send(RELAY_MAGIC + target.raw)
        with trio.fail_after(OPEN_TIMEOUT):
            status = await stream.receive_exactly(1)
            if status != STATUS_OK:
                n = (await stream.receive_exactly(1))[0]
                reason = (await stream.receive_exactly(n)).decode(errors="replace")
                raise PeerLost([target.text], f"relay {session.peer.short} refused: {reason}")
    except trio.TooSlowError:
        stream.reset()
        raise PeerLost([target.text], f"relay {session.peer.short} did not answer") from None
    except BaseException:
        stream.reset()
        raise
    return stream


async def read_header(stream: QuicStream) -> tuple[bytes, PeerId]:
    """(magic, peer id) at the start of a relay request or circuit stream."""
    with trio.fail_after(OPEN_TIMEOUT):
        head = await stream.receive_exactly(len(RELAY_MAGIC) + PEER_ID_BYTES)
    magic = head[:len(RELAY_MAGIC)]
    if magic not in (RELAY_MAGIC, CIRCUIT_MAGIC):
        raise ProtocolError("not a relay stream")
    return magic, PeerId(head[len(RELAY_MAGIC):])
