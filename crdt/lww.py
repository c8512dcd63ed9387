"""Last-writer-wins register map keyed by string (pure delta-state CRDT).

Each key holds one ``LwwEntry``; the entry with the greater HLC timestamp wins,
and a deletion is an entry with ``present=False`` (a tombstone, so a late
delete and a late write order the same way everywhere). Two entries with equal
timestamps can only come from a misbehaving author; they are ordered by their
encoded bytes so merge stays commutative even then.

A delta is itself an ``LwwMap`` (usually one entry); ``merge`` joins any map in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from crdt.hlc import Timestamp
from crdt.messages import LwwEntryMsg, LwwMapMsg, PeerTable, peer_at
from crdt.values import canonical, check_key, pack, untrusted
from peerd.errors import ProtocolError


@dataclass(frozen=True)
class LwwEntry:
    ts: Timestamp
    present: bool
    value: Any

    def rank(self) -> tuple[Timestamp, bool, bytes]:
        return (self.ts, self.present, pack(self.value))


class LwwMap:
    """String-keyed map of LWW registers."""

    __slots__ = ("_entries",)

    def __init__(self, entries: dict[str, LwwEntry] | None = None) -> None:
        self._entries: dict[str, LwwEntry] = dict(entries or {})

    # ------------------------------------------------------------ reading

    def get(self, key: str, default: Any = None) -> Any:
        entry = self._entries.get(key)
        return entry.value if entry is not None and entry.present else default

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key)  # type: ignore[call-overload]
        return entry is not None and entry.present

    def items(self) -> list[tuple[str, Any]]:
        """Live (key, value) pairs, sorted by key."""
        return [(k, e.value) for k, e in sorted(self._entries.items()) if e.present]

    def entry(self, key: str) -> LwwEntry | None:
        """The winning entry for ``key``, tombstones included."""
        return self._entries.get(key)

    def entries(self) -> Iterator[tuple[str, LwwEntry]]:
        return iter(self._entries.items())

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.present)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LwwMap) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"LwwMap({self.items()!r})"

    # ------------------------------------------------------------ delta mutators

    @staticmethod
    def set_delta(key: str, value: Any, ts: Timestamp) -> LwwMap:
        """The delta that sets ``key`` to ``value`` at ``ts``."""
        return LwwMap({check_key(key): LwwEntry(ts, True, canonical(value))})

    @staticmethod
    def delete_delta(key: str, ts: Timestamp) -> LwwMap:
        return LwwMap({check_key(key): LwwEntry(ts, False, None)})

    # ------------------------------------------------------------ join

    def merge(self, other: LwwMap) -> set[str]:
        """Join ``other`` into this map in place; returns the keys whose entry changed."""
        changed: set[str] = set()
        for key, theirs in other._entries.items():
            mine = self._entries.get(key)
            if mine is None or (theirs != mine and theirs.rank() > mine.rank()):
                self._entries[key] = theirs
                changed.add(key)
        return changed

    def copy(self) -> LwwMap:
        return LwwMap(self._entries)

    def join(self, other: LwwMap) -> LwwMap:
        out = self.copy()
        out.merge(other)
        return out

    def authors(self) -> set[bytes]:
        return {e.ts.node for e in self._entries.values()}

    def max_timestamp(self) -> Timestamp | None:
        return max((e.ts for e in self._entries.values()), default=None)

    # ------------------------------------------------------------ wire

    def to_wire(self, author: bytes | None = None) -> LwwMapMsg:
        """Encode; inside a delta pass its ``author`` (implicit peer index 0)."""
        table = PeerTable(author)
        entries = tuple(
            LwwEntryMsg(k, e.ts.wall_ms, e.ts.logical, table(e.ts.node), e.present, e.value)
            for k, e in sorted(self._entries.items())
        )
        return LwwMapMsg(table.peers, entries)

    @classmethod
    def from_wire(cls, msg: LwwMapMsg, author: bytes | None = None) -> LwwMap:
        """Validate a decoded message; raises only ``ProtocolError``."""
        entries: dict[str, LwwEntry] = {}
        for m in msg.entries:
            key = untrusted(check_key, m.key)
            if key in entries:
                raise ProtocolError(f"duplicate LWW key {key!r}")
            try:
                ts = Timestamp(m.wall_ms, m.logical, peer_at(msg.peers, m.peer, author))
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if not m.present and m.value is not None:
                raise ProtocolError("an LWW tombstone carries no value")
            entries[key] = LwwEntry(ts, m.present, m.value)
        return cls(entries)


__all__ = ["LwwEntry", "LwwMap"]
