"""Anti-entropy sync core (sans-I/O): digests, missing deltas, gossip timing, pushes.

A pull is one exchange with one peer: we send our version vector (per author,
the highest seq below which we miss nothing); the peer answers with the deltas
we lack, in chunks of at most ``max_message_bytes``, and its own vector; we then
push what the peer lacks. Every node pulls from ``gossip_fanout`` random peers
each ``gossip_interval`` (jittered so rounds do not synchronise) and pushes each
burst of local writes to ``push_fanout`` random peers after ``push_delay``.

Nothing here performs I/O or reads a clock; the driver passes ``now`` in and
carries the returned bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from crdt.log import DeltaLog, Held
from crdt.messages import CRDT_PROTOCOL_VERSION, DeltaPush, SyncReply, SyncRequest
from peerd.errors import ProtocolError
from peerd.identity import PeerId
from peerd.wire import decode_untrusted, encode

M = TypeVar("M")

METHOD_SYNC = "crdt.sync"
METHOD_PUSH = "crdt.push"
# Ranges held beyond the contiguous prefix, sent with each digest so peers do not
# resend deltas that arrived out of order (by push); leaving some out is safe.
MAX_HELD_RANGES = 2048
_ENVELOPE_SLACK = 1024  # room for the reply's vector and framing around the deltas
MIN_MESSAGE_BYTES = 300 * 1024  # one maximal delta must always fit in a chunk


@dataclass(frozen=True)
class SyncConfig:
    gossip_interval: float = 1.0
    gossip_jitter: float = 0.25
    gossip_fanout: int = 1
    push_fanout: int = 2
    push_delay: float = 0.05
    max_message_bytes: int = 512 * 1024
    max_pull_chunks: int = 64
    max_push_chunks: int = 16

    def __post_init__(self) -> None:
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES}")
        if self.gossip_interval <= 0 or not 0 <= self.gossip_jitter < 1:
            raise ValueError("gossip_interval must be > 0 and gossip_jitter in [0, 1)")


@dataclass(frozen=True)
class Pull:
    """Start an anti-entropy exchange with ``peer``."""

    peer: PeerId


@dataclass(frozen=True)
class Push:
    """Send ``payload`` (an encoded ``DeltaPush``) to ``peer`` one-way."""

    peer: PeerId
    payload: bytes


@dataclass(frozen=True)
class ReplyOutcome:
    deltas: tuple[bytes, ...]
    remote_vv: dict[bytes, int]
    remote_held: Held
    more: bool


@dataclass(frozen=True)
class SyncStatistics:
    rounds: int
    pulls_started: int
    requests_served: int
    pushes_sent: int
    deltas_sent: int
    bytes_sent: int
    bytes_received: int
    malformed: int
    transport_failures: int


def _vv_to_wire(vv: dict[bytes, int]) -> tuple[tuple[bytes, int], ...]:
    return tuple(sorted(vv.items()))


def _vv_from_wire(pairs: tuple[tuple[bytes, int], ...]) -> dict[bytes, int]:
    vv: dict[bytes, int] = {}
    for author, seq in pairs:
        if len(author) != 32 or author in vv or not 0 <= seq < 2**63:
            raise ProtocolError("bad version vector entry")
        vv[author] = seq
    return vv


def _held_to_wire(held: Held) -> tuple[tuple[bytes, int, int], ...]:
    return tuple((a, lo, hi) for a, ranges in sorted(held.items()) for lo, hi in ranges)


def _held_from_wire(triples: tuple[tuple[bytes, int, int], ...]) -> Held:
    held: Held = {}
    for author, lo, hi in triples:
        if len(author) != 32 or not 1 <= lo <= hi < 2**63:
            raise ProtocolError("bad held range")
        held.setdefault(author, []).append((lo, hi))
    for ranges in held.values():
        ranges.sort()
    return held


def _check_version(version: int) -> None:
    if version != CRDT_PROTOCOL_VERSION:
        raise ProtocolError(
            f"CRDT sync version {version}, this node speaks {CRDT_PROTOCOL_VERSION}"
        )


class SyncCore:
    """Sync decisions for one replica whose accepted deltas are in ``log``."""

    def __init__(self, log: DeltaLog, me: PeerId, config: SyncConfig, rng: random.Random) -> None:
        self.log = log
        self.me = me
        self.config = config
        self._rng = rng
        self._next_gossip: float | None = None
        self._push_due: float | None = None
        self._pushed_upto = log.max_seq(me.raw)
        self._n = dict.fromkeys(SyncStatistics.__dataclass_fields__, 0)

    # ------------------------------------------------------------ timing

    def next_wakeup(self) -> float:
        """When ``poll`` next has work (``-inf``: now)."""
        if self._next_gossip is None:
            return float("-inf")
        push_due = self._push_due if self._push_due is not None else float("inf")
        return min(self._next_gossip, push_due)

    def local_write(self, now: float) -> None:
        """A local delta was committed; schedule a push if none is pending."""
        if self._push_due is None:
            self._push_due = now + self.config.push_delay

    def poll(self, now: float, peers: Sequence[PeerId]) -> list[Pull | Push]:
        """Actions due at ``now`` given the currently reachable ``peers``."""
        cfg = self.config
        others = [p for p in peers if p != self.me]
        actions: list[Pull | Push] = []
        if self._next_gossip is None:
            # Stagger the first round so nodes started together do not gossip in lockstep.
            self._next_gossip = now + self._rng.uniform(0, cfg.gossip_interval)
        elif now >= self._next_gossip:
            self._n["rounds"] += 1
            jitter = self._rng.uniform(1 - cfg.gossip_jitter, 1 + cfg.gossip_jitter)
            self._next_gossip = now + cfg.gossip_interval * jitter
            for peer in self._rng.sample(others, min(cfg.gossip_fanout, len(others))):
                self._n["pulls_started"] += 1
                actions.append(Pull(peer))
        if self._push_due is not None and now >= self._push_due:
            self._push_due = None
            blobs = self.log.blobs_of(self.me.raw, self._pushed_upto)
            self._pushed_upto = self.log.max_seq(self.me.raw)
            targets = self._rng.sample(others, min(cfg.push_fanout, len(others)))
            for payload in self._push_payloads(blobs):
                actions.extend(Push(peer, payload) for peer in targets)
                self._count_push(payload, len(targets))
            self._n["deltas_sent"] += len(blobs) * len(targets)
        return actions

    # ------------------------------------------------------------ pull exchange

    def make_request(self) -> bytes:
        req = SyncRequest(
            CRDT_PROTOCOL_VERSION,
            _vv_to_wire(self.log.version_vector()),
            _held_to_wire(self.log.held_ranges(MAX_HELD_RANGES)),
            self.config.max_message_bytes,
        )
        return self._sent(encode(req))

    def handle_request(self, body: bytes) -> bytes:
        """Serve a peer's pull; raises only ``ProtocolError``."""
        with self._counting_malformed():
            req = self._decode(body, SyncRequest)
            remote = _vv_from_wire(req.vv)
            remote_held = _held_from_wire(req.held)
        budget = max(MIN_MESSAGE_BYTES, min(req.max_bytes, self.config.max_message_bytes))
        vv = _vv_to_wire(self.log.version_vector())
        held = _held_to_wire(self.log.held_ranges(MAX_HELD_RANGES))
        authors = self.log.authors()
        # Random author order so a peer that needs many chunks gets every author
        # progressing, not the first author's whole history first.
        self._rng.shuffle(authors)
        room = budget - 40 * len(vv) - 50 * len(held) - _ENVELOPE_SLACK
        chunk = self.log.missing_for(remote, room, authors, remote_held)
        self._n["requests_served"] += 1
        self._n["deltas_sent"] += len(chunk.blobs)
        reply = SyncReply(CRDT_PROTOCOL_VERSION, vv, held, tuple(chunk.blobs), chunk.more)
        return self._sent(encode(reply))

    def handle_reply(self, body: bytes) -> ReplyOutcome:
        with self._counting_malformed():
            reply = self._decode(body, SyncReply)
            return ReplyOutcome(
                reply.deltas, _vv_from_wire(reply.vv), _held_from_wire(reply.held), reply.more
            )

    def pushes_for(
        self, remote_vv: dict[bytes, int], remote_held: Held | None = None
    ) -> list[bytes]:
        """Encoded pushes carrying what the holder of ``remote_vv`` and
        ``remote_held`` lacks (bounded in count and size)."""
        out: list[bytes] = []
        budget = self.config.max_message_bytes - _ENVELOPE_SLACK
        authors = self.log.authors()
        self._rng.shuffle(authors)
        remaining = dict(remote_vv)
        for _ in range(self.config.max_push_chunks):
            chunk = self.log.missing_for(remaining, budget, authors, remote_held)
            if not chunk.blobs:
                break
            payload = encode(DeltaPush(CRDT_PROTOCOL_VERSION, tuple(chunk.blobs)))
            out.append(payload)
            self._count_push(payload, 1)
            self._n["deltas_sent"] += len(chunk.blobs)
            if not chunk.more:
                break
            remaining.update(chunk.upto)
        return out

    def handle_push(self, body: bytes) -> tuple[bytes, ...]:
        with self._counting_malformed():
            return self._decode(body, DeltaPush).deltas

    # ------------------------------------------------------------ helpers

    def _push_payloads(self, blobs: list[bytes]) -> list[bytes]:
        budget = self.config.max_message_bytes - _ENVELOPE_SLACK
        chunks: list[list[bytes]] = [[]]
        size = 0
        for blob in blobs:
            if chunks[-1] and size + len(blob) > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(blob)
            size += len(blob)
        return [encode(DeltaPush(CRDT_PROTOCOL_VERSION, tuple(c))) for c in chunks if c]

    def transport_failed(self) -> None:
        """The driver reports a call or push that failed (peer lost, timeout, ...)."""
        self._n["transport_failures"] += 1

    def _count_push(self, payload: bytes, copies: int) -> None:
        self._n["pushes_sent"] += copies
        self._n["bytes_sent"] += len(payload) * copies

    def _sent(self, payload: bytes) -> bytes:
        self._n["bytes_sent"] += len(payload)
        return payload

    def _decode(self, body: bytes, cls: type[M]) -> M:
        """The one door for sync messages from peers; raises only ``ProtocolError``."""
        self._n["bytes_received"] += len(body)
        msg = decode_untrusted(body, expect=cls)
        _check_version(msg.version)
        return msg

    @contextmanager
    def _counting_malformed(self) -> Iterator[None]:
        try:
            yield
        except ProtocolError:
            self._n["malformed"] += 1
            raise

    def statistics(self) -> SyncStatistics:
        return SyncStatistics(**self._n)


__all__ = [
    "METHOD_PUSH",
    "METHOD_SYNC",
    "Pull",
    "Push",
    "ReplyOutcome",
    "SyncConfig",
    "SyncCore",
    "SyncStatistics",
]
