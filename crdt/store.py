"""The replicated store of one node: named CRDT documents over a signed delta log.

Local writes become sealed deltas that are committed to SQLite *before* they are
applied and acknowledged; remote deltas go through one door, ``ingest``, which
verifies each (swarm proof, author key, signature, contents), commits the new
ones in one transaction and only then merges them. Rejections are counted, never
raised into the caller. The state is a pure function of the set of accepted
deltas, so reopening the database restores it exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdt.counter import PNCounter
from crdt.delta import (
    Delta,
    DeltaRejected,
    Op,
    Rejection,
    State,
    op_to_wire,
    open_delta,
    parse_envelope,
    seal,
)
from crdt.documents import CounterDoc, MapDoc, SetDoc
from crdt.hlc import HybridClock, Timestamp
from crdt.log import DeltaLog
from crdt.lww import LwwMap
from crdt.messages import DocKind
from crdt.notify import Change, ChangeNotifier, Subscription
from crdt.orset import ORSet
from crdt.persist import DB_FILENAME, DeltaDB
from peerd.errors import ConfigError
from peerd.identity import Identity, PeerId, SwarmKey
from peerd.wire import encode


@dataclass(frozen=True)
class StoreStatistics:
    local_writes: int
    accepted: int
    duplicates: int
    equivocations: int
    rejected_malformed: int
    rejected_membership: int
    rejected_author: int
    rejected_signature: int
    rejected_invalid: int
    deltas: int
    log_bytes: int
    authors: int
    documents: int

    @property
    def rejected(self) -> int:
        return (
            self.rejected_malformed
            + self.rejected_membership
            + self.rejected_author
            + self.rejected_signature
            + self.rejected_invalid
        )


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejected: int


_EMPTY: dict[DocKind, Callable[[], State]] = {
    DocKind.MAP: LwwMap,
    DocKind.ORSET: ORSet,
    DocKind.COUNTER: PNCounter,
}


class Store:
    """Named documents (``doc``/``orset``/``counter``) replicated through signed deltas.

    ``wall_clock`` returns seconds since the epoch and feeds the hybrid logical
    clock of LWW writes; tests pass a fake. Write methods are synchronous and
    return once the write is durable.
    """

    def __init__(
        self,
        identity: Identity,
        swarm_key: SwarmKey,
        db: DeltaDB,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.swarm_key = swarm_key
        self._db = db
        self._wall_clock = wall_clock
        self._me = identity.peer_id.raw
        self._hlc = HybridClock(self._me)
        self.log = DeltaLog()
        self._docs: dict[tuple[DocKind, str], State] = {}
        self._encoded: dict[tuple[DocKind, str], bytes] = {}  # per-document cache
        self._notifier = ChangeNotifier()
        self._write_listeners: list[Callable[[Delta], None]] = []
        self._counts: dict[str, int] = {"local": 0, "accepted": 0, "dup": 0, "equivocation": 0}
        self._rejected = dict.fromkeys(Rejection, 0)
        self._restore()

    @classmethod
    def open(
        cls,
        directory: Path | None,
        identity: Identity,
        swarm_key: SwarmKey,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> Store:
        """Open (or create) the store in ``directory``; ``None`` keeps it in memory."""
        path = None if directory is None else Path(directory) / DB_FILENAME
        return cls(identity, swarm_key, DeltaDB(path, swarm_key.fingerprint), wall_clock=wall_clock)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    # ------------------------------------------------------------ documents

    def doc(self, name: str) -> MapDoc:
        return MapDoc(self, name)

    def orset(self, name: str) -> SetDoc:
        return SetDoc(self, name)

    def counter(self, name: str) -> CounterDoc:
        return CounterDoc(self, name)

    def state(self, kind: DocKind, name: str) -> Any:
        """The live CRDT of a document (read it, never mutate it), or None."""
        return self._docs.get((kind, name))

    def names(self, prefix: str = "") -> list[tuple[DocKind, str]]:
        return sorted(k for k in self._docs if k[1].startswith(prefix))

    def tick(self) -> Timestamp:
        return self._hlc.tick(self._now_ms())

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    # ------------------------------------------------------------ writing

    def commit(self, ops: Sequence[Op]) -> Delta:
        """Seal ``ops`` as this node's next delta, make it durable, then apply it."""
        delta = seal(self.identity, self.swarm_key, self.log.max_seq(self._me) + 1, tuple(ops))
        self._db.append([(delta.author, delta.seq, delta.digest, delta.blob)])
        self._accept(delta)
        self._counts["local"] += 1
        for listener in self._write_listeners:
            listener(delta)
        return delta

    def add_write_listener(self, listener: Callable[[Delta], None]) -> None:
        """Call ``listener`` after each durable local write (the sync driver pushes)."""
        self._write_listeners.append(listener)

    def ingest(self, blobs: Iterable[bytes]) -> IngestResult:
        """Verify remote sealed deltas, persist the new ones, then merge them."""
        fresh: dict[tuple[bytes, int], Delta] = {}
        accepted = duplicates = rejected = 0
        for blob in blobs:
            try:
                env = parse_envelope(blob, self.swarm_key)
                key = (env.body.author, env.body.seq)
                held = self.log.get(*key)
                known = held.digest if held is not None else None
                if known is None and key in fresh:
                    known = fresh[key].digest
                if known == env.digest:
                    duplicates += 1
                    continue
                delta = open_delta(env)
            except DeltaRejected as exc:
                self._rejected[exc.reason] += 1
                rejected += 1
                continue
            if known is not None:
                # A valid signature over different contents for a held (author, seq):
                # the author equivocated (or lost its database). Keep the first.
                self._counts["equivocation"] += 1
                continue
            fresh[key] = delta
        if fresh:
            self._db.append((d.author, d.seq, d.digest, d.blob) for d in fresh.values())
            for delta in fresh.values():
                self._accept(delta)
            accepted = len(fresh)
        self._counts["accepted"] += accepted
        self._counts["dup"] += duplicates
        return IngestResult(accepted, duplicates, rejected)

    def _accept(self, delta: Delta) -> None:
        self.log.add(delta.author, delta.seq, delta.digest, delta.blob)
        self._notifier.accepted()
        now_ms = self._now_ms()
        for op in delta.ops:
            if isinstance(op.state, LwwMap):
                newest = op.state.max_timestamp()
                if newest is not None and newest.node != self._me:
                    self._hlc.observe(newest, now_ms)
            key = (op.kind, op.name)
            doc = self._docs.get(key)
            if doc is None:
                doc = self._docs[key] = _EMPTY[op.kind]()
            if doc.merge(op.state):  # type: ignore[arg-type]
                self._encoded.pop(key, None)
                self._notifier.changed(Change(op.kind, op.name))

    def _restore(self) -> None:
        """Replay the persisted log (it was verified when first accepted)."""
        for author, _seq, _digest, blob in self._db.load():
            try:
                delta = open_delta(parse_envelope(blob, self.swarm_key), check_signature=False)
            except DeltaRejected as exc:
                raise ConfigError(f"CRDT database {self._db.path} is corrupt: {exc}") from None
            self._accept(delta)
            if author == self._me:
                for op in delta.ops:
                    if isinstance(op.state, LwwMap) and (ts := op.state.max_timestamp()):
                        self._hlc.observe(ts, ts.wall_ms)

    # ------------------------------------------------------------ observing

    def version(self, name: str | None = None) -> int:
        """Without ``name``: the number of deltas accepted (local and remote). With it:
        how often the state of the documents called ``name`` changed."""
        return self._notifier.version if name is None else self._notifier.version_of(name)

    async def wait_changed(self, name: str | None, version: int) -> int:
        """Wait until ``version(name)`` exceeds ``version``; returns the new value."""
        if name is None:
            return await self._notifier.wait_any(version)
        return await self._notifier.wait_changed(name, version)

    def subscribe(self, prefix: str = "") -> AbstractAsyncContextManager[Subscription]:
        """``async with store.subscribe("run/") as changes: async for change in changes``."""
        return self._notifier.subscribe(prefix)

    def _encoding(self, key: tuple[DocKind, str]) -> bytes:
        encoded = self._encoded.get(key)
        if encoded is None:
            encoded = self._encoded[key] = _encode_doc(key, self._docs[key])
        return encoded

    def snapshot(self) -> bytes:
        """Canonical encoding of every document: equal bytes iff equal state."""
        return b"".join(self._encoding(k) for k in sorted(self._docs))

    def full_state_bytes(self) -> int:
        """Size of a full-state encoding (what a state-based CRDT would ship)."""
        return sum(len(self._encoding(k)) for k in self._docs)

    def statistics(self) -> StoreStatistics:
        c = self._counts
        return StoreStatistics(
            local_writes=c["local"],
            accepted=c["accepted"],
            duplicates=c["dup"],
            equivocations=c["equivocation"],
            rejected_malformed=self._rejected[Rejection.MALFORMED],
            rejected_membership=self._rejected[Rejection.MEMBERSHIP],
            rejected_author=self._rejected[Rejection.AUTHOR],
            rejected_signature=self._rejected[Rejection.SIGNATURE],
            rejected_invalid=self._rejected[Rejection.INVALID],
            deltas=len(self.log),
            log_bytes=self.log.total_bytes,
            authors=len(self.log.authors()),
            documents=len(self._docs),
        )


def _encode_doc(key: tuple[DocKind, str], state: State) -> bytes:
    return encode(op_to_wire(Op(key[0], key[1], state)))


__all__ = ["IngestResult", "Store", "StoreStatistics"]
