"""Wire messages of the CRDT store (type ids 300-399).

States and deltas name peers through a per-message table (``peers``) and refer
to them by index; inside a delta the author is implicitly index 0, so its
32-byte id appears once, in the signed body, however many entries it holds.
Conversions to and from the pure CRDT types live next to those types;
``peer_at`` is the bounds-checked index lookup they share.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from peerd.errors import ProtocolError
from peerd.wire import message

CRDT_PROTOCOL_VERSION = 1


class DocKind(enum.IntEnum):
    """Which CRDT a document is. A name may exist once per kind."""

    MAP = 1
    ORSET = 2
    COUNTER = 3


@message(300)
@dataclass(frozen=True)
class LwwEntryMsg:
    key: str
    wall_ms: int
    logical: int
    peer: int
    present: bool
    value: Any


@message(301)
@dataclass(frozen=True)
class LwwMapMsg:
    peers: tuple[bytes, ...]
    entries: tuple[LwwEntryMsg, ...]


@message(302)
@dataclass(frozen=True)
class OrSetEntryMsg:
    element: Any
    dots: tuple[tuple[int, int], ...]


@message(303)
@dataclass(frozen=True)
class OrSetMsg:
    peers: tuple[bytes, ...]
    entries: tuple[OrSetEntryMsg, ...]
    ctx_vv: tuple[tuple[int, int], ...]
    ctx_cloud: tuple[tuple[int, int], ...]


@message(304)
@dataclass(frozen=True)
class PNCounterMsg:
    peers: tuple[bytes, ...]
    p: tuple[tuple[int, int], ...]
    n: tuple[tuple[int, int], ...]


@message(310)
@dataclass(frozen=True)
class DocOp:
    """One document's delta; exactly the field matching ``kind`` is set."""

    kind: DocKind
    name: str
    map: LwwMapMsg | None = None
    orset: OrSetMsg | None = None
    counter: PNCounterMsg | None = None

    def __post_init__(self) -> None:
        present = {
            DocKind.MAP: self.map,
            DocKind.ORSET: self.orset,
            DocKind.COUNTER: self.counter,
        }
        if sum(v is not None for v in present.values()) != 1 or present[self.kind] is None:
            raise ValueError("a DocOp carries exactly the delta of its kind")


@message(311)
@dataclass(frozen=True)
class DeltaBody:
    """What an author signs: its ``seq``-th delta, touching one or more documents."""

    version: int
    author: bytes
    seq: int
    ops: tuple[DocOp, ...]


@message(312)
@dataclass(frozen=True)
class SignedDelta:
    """``body`` is the encoded ``DeltaBody``, kept as bytes so it is verified,
    stored and relayed exactly as its author produced it."""

    body: bytes
    public_key: bytes
    signature: bytes
    proof: bytes


@message(320)
@dataclass(frozen=True)
class SyncRequest:
    """Anti-entropy pull: "this is what I hold": per author the contiguous seq
    prefix (``vv``) plus ranges held beyond it (``held``: author, first, last)."""

    version: int
    vv: tuple[tuple[bytes, int], ...]
    held: tuple[tuple[bytes, int, int], ...]
    max_bytes: int


@message(321)
@dataclass(frozen=True)
class SyncReply:
    """Encoded ``SignedDelta``s the requester lacks (one chunk), the responder's
    own version vector and held ranges, and whether more chunks remain."""

    version: int
    vv: tuple[tuple[bytes, int], ...]
    held: tuple[tuple[bytes, int, int], ...]
    deltas: tuple[bytes, ...]
    more: bool


@message(322)
@dataclass(frozen=True)
class DeltaPush:
    """Unsolicited deltas: fresh local writes, or what a pull showed the peer lacks."""

    version: int
    deltas: tuple[bytes, ...]


def peer_at(peers: tuple[bytes, ...], index: int, implicit: bytes | None = None) -> bytes:
    """The peer at ``index`` for untrusted input; ``ProtocolError`` when out of range.

    Inside a delta the author is ``implicit``: index 0, not listed in ``peers``
    (it is already in the signed body once)."""
    if implicit is not None:
        if index == 0:
            return implicit
        index -= 1
    if not 0 <= index < len(peers):
        raise ProtocolError(f"peer index {index} outside table of {len(peers)}")
    raw = peers[index]
    if len(raw) != 32:
        raise ProtocolError("peer id in table is not 32 bytes")
    return raw


class PeerTable:
    """Builds the ``peers`` table of an outgoing message (see ``peer_at``)."""

    def __init__(self, implicit: bytes | None = None) -> None:
        self._implicit = implicit
        self._index: dict[bytes, int] = {} if implicit is None else {implicit: 0}

    def __call__(self, raw: bytes) -> int:
        return self._index.setdefault(raw, len(self._index))

    @property
    def peers(self) -> tuple[bytes, ...]:
        return tuple(p for p in self._index if p != self._implicit)


__all__ = [
    "CRDT_PROTOCOL_VERSION",
    "DeltaBody",
    "DeltaPush",
    "DocKind",
    "DocOp",
    "LwwEntryMsg",
    "LwwMapMsg",
    "OrSetEntryMsg",
    "OrSetMsg",
    "PNCounterMsg",
    "PeerTable",
    "SignedDelta",
    "SyncReply",
    "SyncRequest",
    "peer_at",
]
