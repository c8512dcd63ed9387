"""Positive-negative counter (pure delta-state CRDT).

Each replica owns two monotonically growing totals, increments ``p`` and
decrements ``n``; the value is ``sum(p) - sum(n)`` and join is the pointwise
maximum. A delta carries only its author's new totals.
"""

from __future__ import annotations

from crdt.messages import PeerTable, PNCounterMsg, peer_at
from peerd.errors import ProtocolError

MAX_TOTAL = 2**63 - 1


class PNCounter:
    __slots__ = ("n", "p")

    def __init__(self, p: dict[bytes, int] | None = None, n: dict[bytes, int] | None = None):
        self.p: dict[bytes, int] = {r: v for r, v in (p or {}).items() if v}
        self.n: dict[bytes, int] = {r: v for r, v in (n or {}).items() if v}

    def value(self) -> int:
        return sum(self.p.values()) - sum(self.n.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PNCounter) and (self.p, self.n) == (other.p, other.n)

    def __repr__(self) -> str:
        return f"PNCounter({self.value()})"

    def increment_delta(self, replica: bytes, amount: int) -> PNCounter:
        """The delta by which ``replica`` adds ``amount`` (negative decrements)."""
        if type(amount) is not int:
            raise ValueError("a counter increment is an int")
        p, n = self.p.get(replica, 0), self.n.get(replica, 0)
        if amount >= 0:
            p += amount
        else:
            n -= amount
        if p > MAX_TOTAL or n > MAX_TOTAL:
            raise ValueError("counter total would exceed 2**63 - 1")
        return PNCounter({replica: p}, {replica: n})

    def merge(self, other: PNCounter) -> bool:
        """Join ``other`` in place; True when anything changed."""
        changed = False
        for mine, theirs in ((self.p, other.p), (self.n, other.n)):
            for replica, total in theirs.items():
                if total > mine.get(replica, 0):
                    mine[replica] = total
                    changed = True
        return changed

    def copy(self) -> PNCounter:
        return PNCounter(self.p, self.n)

    def join(self, other: PNCounter) -> PNCounter:
        out = self.copy()
        out.merge(other)
        return out

    def replicas(self) -> set[bytes]:
        return set(self.p) | set(self.n)

    def to_wire(self, author: bytes | None = None) -> PNCounterMsg:
        """Encode; inside a delta pass its ``author`` (implicit peer index 0)."""
        table = PeerTable(author)
        p = tuple((table(r), v) for r, v in sorted(self.p.items()))
        n = tuple((table(r), v) for r, v in sorted(self.n.items()))
        return PNCounterMsg(table.peers, p, n)

    @classmethod
    def from_wire(cls, msg: PNCounterMsg, author: bytes | None = None) -> PNCounter:
        """Validate a decoded message; raises only ``ProtocolError``."""

        def totals(pairs: tuple[tuple[int, int], ...]) -> dict[bytes, int]:
            out: dict[bytes, int] = {}
            for index, total in pairs:
                replica = peer_at(msg.peers, index, author)
                if replica in out or not 0 <= total <= MAX_TOTAL:
                    raise ProtocolError("duplicate replica or total out of range in counter")
                out[replica] = total
            return out

        return cls(totals(msg.p), totals(msg.n))


__all__ = ["PNCounter"]
