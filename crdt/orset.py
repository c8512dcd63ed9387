"""Add-wins observed-remove set (pure delta-state CRDT, "optimised" AWOR-set).

Every add creates a unique dot ``(replica, counter)``; the set remembers which
dots each element carries and a causal context of every dot it has seen.
Removing an element puts its observed dots in the context without the element,
so a concurrent add (whose dot the remover never saw) survives: add wins.
The context compacts to a version vector plus a "cloud" of out-of-order dots,
so removed elements leave no per-element tombstones behind.
"""

from __future__ import annotations

from collections.abc import Iterable

from crdt.messages import OrSetEntryMsg, OrSetMsg, PeerTable, peer_at
from crdt.values import Element, check_element, element_sort_key, untrusted
from peerd.errors import ProtocolError

Dot = tuple[bytes, int]


class DotContext:
    """A set of dots stored as per-replica contiguous prefix + the rest."""

    __slots__ = ("cloud", "vv")

    def __init__(self, vv: dict[bytes, int] | None = None, cloud: Iterable[Dot] = ()) -> None:
        self.vv: dict[bytes, int] = dict(vv or {})
        self.cloud: set[Dot] = set(cloud)
        self.compact()

    def __contains__(self, dot: Dot) -> bool:
        return dot[1] <= self.vv.get(dot[0], 0) or dot in self.cloud

    def max_counter(self, replica: bytes) -> int:
        in_cloud = (c for r, c in self.cloud if r == replica)
        return max(self.vv.get(replica, 0), *in_cloud, 0)

    def add(self, dots: Iterable[Dot]) -> None:
        self.cloud.update(dots)
        self.compact()

    def merge(self, other: DotContext) -> None:
        for replica, counter in other.vv.items():
            if counter > self.vv.get(replica, 0):
                self.vv[replica] = counter
        self.cloud.update(other.cloud)
        self.compact()

    def compact(self) -> None:
        """Fold cloud dots that extend a replica's contiguous prefix into ``vv``."""
        for replica, counter in sorted(self.cloud):
            if counter == self.vv.get(replica, 0) + 1:
                self.vv[replica] = counter
        self.cloud = {d for d in self.cloud if d[1] > self.vv.get(d[0], 0)}

    def copy(self) -> DotContext:
        return DotContext(self.vv, self.cloud)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DotContext) and (self.vv, self.cloud) == (other.vv, other.cloud)


class ORSet:
    """Add-wins set of ``str | int | bytes`` elements."""

    __slots__ = ("ctx", "entries")

    def __init__(
        self, entries: dict[Element, frozenset[Dot]] | None = None, ctx: DotContext | None = None
    ) -> None:
        self.entries: dict[Element, frozenset[Dot]] = {
            e: d for e, d in (entries or {}).items() if d
        }
        self.ctx = ctx if ctx is not None else DotContext()

    def __contains__(self, element: object) -> bool:
        return element in self.entries

    def elements(self) -> list[Element]:
        return sorted(self.entries, key=element_sort_key)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ORSet) and (self.entries, self.ctx) == (other.entries, other.ctx)

    def __repr__(self) -> str:
        return f"ORSet({self.elements()!r})"

    # ------------------------------------------------------------ delta mutators

    def add_delta(self, element: Element, replica: bytes) -> ORSet:
        """The delta by which ``replica`` adds ``element`` (superseding its old dots)."""
        element = check_element(element)
        dot = (replica, self.ctx.max_counter(replica) + 1)
        old = self.entries.get(element, frozenset())
        return ORSet({element: frozenset({dot})}, DotContext(cloud={dot, *old}))

    def remove_delta(self, element: Element) -> ORSet:
        """The delta that removes every observed instance of ``element``."""
        return ORSet({}, DotContext(cloud=self.entries.get(element, frozenset())))

    # ------------------------------------------------------------ join

    def merge(self, other: ORSet) -> set[Element]:
        """Join ``other`` in place; returns the elements whose dots changed."""
        changed: set[Element] = set()
        for element in set(self.entries) | set(other.entries):
            mine = self.entries.get(element, frozenset())
            theirs = other.entries.get(element, frozenset())
            kept = (
                (mine & theirs)
                | {d for d in mine if d not in other.ctx}
                | {d for d in theirs if d not in self.ctx}
            )
            if kept != mine:
                changed.add(element)
                if kept:
                    self.entries[element] = frozenset(kept)
                else:
                    del self.entries[element]
        self.ctx.merge(other.ctx)
        return changed

    def copy(self) -> ORSet:
        return ORSet(self.entries, self.ctx.copy())

    def join(self, other: ORSet) -> ORSet:
        out = self.copy()
        out.merge(other)
        return out

    def entry_replicas(self) -> set[bytes]:
        """Replicas that created the dots of live entries (an add delta's author)."""
        return {r for dots in self.entries.values() for r, _ in dots}

    # ------------------------------------------------------------ wire

    def to_wire(self, author: bytes | None = None) -> OrSetMsg:
        """Encode; inside a delta pass its ``author`` (implicit peer index 0)."""
        table = PeerTable(author)
        # Register peers in sorted order first: indices must not depend on set
        # iteration order, or equal states would encode to different bytes.
        replicas = self.entry_replicas() | set(self.ctx.vv) | {r for r, _ in self.ctx.cloud}
        for replica in sorted(replicas):
            table(replica)
        entries = tuple(
            OrSetEntryMsg(e, tuple(sorted((table(r), c) for r, c in self.entries[e])))
            for e in self.elements()
        )
        vv = tuple((table(r), c) for r, c in sorted(self.ctx.vv.items()))
        cloud = tuple((table(r), c) for r, c in sorted(self.ctx.cloud))
        return OrSetMsg(table.peers, entries, vv, cloud)

    @classmethod
    def from_wire(cls, msg: OrSetMsg, author: bytes | None = None) -> ORSet:
        """Validate a decoded message; raises only ``ProtocolError``."""

        def dots(pairs: tuple[tuple[int, int], ...]) -> list[Dot]:
            out = [(peer_at(msg.peers, i, author), c) for i, c in pairs]
            if any(c < 1 for _, c in out):
                raise ProtocolError("dot counters start at 1")
            return out

        vv: dict[bytes, int] = {}
        for replica, counter in dots(msg.ctx_vv):
            if replica in vv:
                raise ProtocolError("duplicate replica in OR-set context")
            vv[replica] = counter
        ctx = DotContext(vv, dots(msg.ctx_cloud))
        entries: dict[Element, frozenset[Dot]] = {}
        for m in msg.entries:
            element = untrusted(check_element, m.element)
            entry_dots = frozenset(dots(m.dots))
            if element in entries or not entry_dots:
                raise ProtocolError("duplicate or empty OR-set entry")
            if any(d not in ctx for d in entry_dots):
                raise ProtocolError("OR-set entry dot missing from its context")
            entries[element] = entry_dots
        return cls(entries, ctx)


__all__ = ["DotContext", "ORSet"]
