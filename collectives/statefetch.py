"""Moving state pieces: holders serve, downloaders fetch from several at once (trio).

A holder exposes its state for one sync under a key; a downloader asks each
holder (``Fetch``) for the pieces ``collectives.state.assign`` gave it, and
the holder sends each piece straight from the caller's tensor memory. Every
piece is checked against the popular state's piece hash before it is written
in place, so a holder serving corrupted bytes is caught at the first bad
piece and dropped from the source list; so is a holder that is lost, refuses
or misses its deadline. Whatever it did not deliver is striped again over
the holders left, until every piece has arrived or no holder is left.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio

from collectives.agree import recv_from
from collectives.driver import MembershipDriver
from collectives.state import PieceRef, TensorInfo, assign, hash_piece, piece_count
from collectives.statebuf import RawTensor
from collectives.statemsg import Fetch, FetchDone
from peerd.errors import PeerLost, ProtocolError, RemoteError, Timeout
from peerd.log import event
from peerd.wire import decode_untrusted, encode

log = logging.getLogger("collectives.statefetch")

SEND_CONCURRENCY = 2  # pieces a holder has in flight per request: keeps the link busy
FETCH_BATCH = 16384  # pieces per request (16 GiB): well inside the wire's item limits


def piece_key(key: bytes, round_: int, tensor: int, piece: int) -> bytes:
    return key + b"%d/%d.%d" % (round_, tensor, piece)


@dataclass
class Exposure:
    """What this peer serves during one sync (only if it holds the popular state)."""

    key: bytes
    members: frozenset[str]
    tensors: list[RawTensor]  # in name-sorted order, as ``PieceRef.tensor`` counts
    serving: bool = False
    sent: int = 0


async def serve(driver: MembershipDriver, exposure: Exposure | None, peer: str,
                payload: bytes) -> bytes:
    """Answer a ``Fetch``: send the asked pieces, then reply ``FetchDone``."""
    msg: Fetch = decode_untrusted(payload, expect=Fetch)
    ex = exposure
    if ex is None or msg.key != ex.key or not ex.serving or peer not in ex.members:
        raise ProtocolError("this peer exposes no such state")
    wanted = list(zip(msg.tensors, msg.pieces, strict=True))
    for t, p in wanted:
        if t >= len(ex.tensors) or p >= piece_count(ex.tensors[t].nbytes):
            raise ProtocolError(f"no piece {t}.{p} in this state")
    sent = 0
    queue = iter(wanted)

    async def sender() -> None:
        nonlocal sent
        for t, p in queue:
            data = ex.tensors[t].piece(p)
            await driver.fabric.send_data(peer, piece_key(ex.key, msg.round, t, p), data)
            sent += len(data)
            ex.sent += len(data)

    async with trio.open_nursery() as nursery:
        for _ in range(SEND_CONCURRENCY):
            nursery.start_soon(sender)
    return encode(FetchDone(sent))


@dataclass
class Download:
    """One downloader's fetch of ``pieces`` of the winner from ``holders``."""

    driver: MembershipDriver
    method: str
    key: bytes
    winner: Sequence[TensorInfo]  # name-sorted
    tensors: Sequence[RawTensor]  # the caller's, same order
    holders: Sequence[str]
    bad: set[str] = field(default_factory=set)
    received: int = 0
    corrupt: int = 0
    rounds: int = 0

    async def run(self, pieces: Sequence[PieceRef]) -> None:
        """Fetch and install every piece; ``PeerLost`` naming the holders when none is left."""
        pending = list(pieces)
        while pending:
            sources = [h for h in self.holders
                       if h not in self.bad and h not in self.driver.core.suspects]
            if not sources:
                raise PeerLost(self.holders, "no holder of the popular state is left to serve it")
            done: set[tuple[int, int]] = set()
            async with trio.open_nursery() as nursery:
                for src, refs in assign(pending, sources).items():
                    nursery.start_soon(self._from, src, refs, self.rounds, done)
            pending = [r for r in pending if (r.tensor, r.piece) not in done]
            self.rounds += 1

    async def _from(self, src: str, refs: list[PieceRef], round_: int,
                    done: set[tuple[int, int]]) -> None:
        """Fetch ``refs`` from ``src``; on any shortfall ``src`` joins ``bad``."""
        cfg = self.driver.config
        nbytes = sum(r.nbytes for r in refs)
        deadline = trio.current_time() + cfg.phase_timeout + nbytes / cfg.min_bandwidth
        batches = [refs[i:i + FETCH_BATCH] for i in range(0, len(refs), FETCH_BATCH)]
        why = ""
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    nonlocal why
                    try:
                        for batch in batches:
                            request = encode(Fetch(
                                self.driver.run, self.key, round_,
                                tuple(r.tensor for r in batch), tuple(r.piece for r in batch)))
                            reply = await self.driver.fabric.call(
                                src, self.method, request,
                                max(0.0, deadline - trio.current_time()))
                            decode_untrusted(reply, expect=FetchDone)
                    except PeerLost as exc:
                        self.driver.lost({src}, f"state download: {exc}")
                        why = str(exc)
                        nursery.cancel_scope.cancel()
                    except (Timeout, RemoteError, ProtocolError) as exc:
                        why = str(exc)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(ask)
                try:
                    for ref in refs:
                        key = piece_key(self.key, round_, ref.tensor, ref.piece)
                        data = await recv_from(self.driver, src, key, deadline, "state download")
                        expect = self.winner[ref.tensor].pieces[ref.piece]
                        if len(data) != ref.nbytes or hash_piece(data) != expect:
                            self.corrupt += 1
                            why = f"piece {ref.tensor}.{ref.piece} fails its hash check"
                            event(log, "collectives.state_corrupt", logging.WARNING,
                                  me=self.driver.me, source=src, piece=(ref.tensor, ref.piece))
                            break
                        self.tensors[ref.tensor].install(ref.piece, data)
                        done.add((ref.tensor, ref.piece))
                        self.received += len(data)
                except PeerLost as exc:
                    why = str(exc)
                nursery.cancel_scope.cancel()
        if not all((r.tensor, r.piece) in done for r in refs):
            self.bad.add(src)
            event(log, "collectives.state_source_dropped", me=self.driver.me, source=src,
                  missing=sum((r.tensor, r.piece) not in done for r in refs),
                  why=why or "deadline passed")


def download_bytes(winner: Mapping[str, TensorInfo], mine: Mapping[str, TensorInfo]) -> int:
    """Bytes a peer announcing ``mine`` must fetch (all of them if incompatible)."""
    if set(mine) != set(winner):
        return sum(t.nbytes for t in winner.values())
    return sum(t.nbytes for n, t in winner.items() if mine[n].digest != t.digest)
