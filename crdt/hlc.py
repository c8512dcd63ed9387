"""Hybrid logical clock (sans-I/O): physical milliseconds + logical counter.

A timestamp orders LWW writes. Its total order is ``(wall_ms, logical, node)``;
``node`` is the writer's raw peer id, so two writers never produce equal
timestamps and every replica breaks ties the same way. The caller passes the
physical time in; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# A remote timestamp further than this ahead of our physical clock does not pull
# our clock forward: one peer with a broken clock must not drag every later
# write of the swarm into its future (the delta itself is still merged, so
# replicas converge; that peer's writes simply win until real time catches up).
MAX_DRIFT_MS = 60_000
MAX_WALL_MS = 2**62
MAX_LOGICAL = 2**31


@dataclass(frozen=True, order=True)
class Timestamp:
    """One HLC reading; compares by (wall_ms, logical, node)."""

    wall_ms: int
    logical: int
    node: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.wall_ms < MAX_WALL_MS or not 0 <= self.logical < MAX_LOGICAL:
            raise ValueError("timestamp out of range")
        if len(self.node) != 32:
            raise ValueError("timestamp node must be a 32-byte peer id")


class HybridClock:
    """The HLC of one node; ``node`` is its raw peer id."""

    __slots__ = ("_logical", "_wall", "node")

    def __init__(self, node: bytes) -> None:
        self.node = node
        self._wall = 0
        self._logical = 0

    @property
    def last(self) -> tuple[int, int]:
        return (self._wall, self._logical)

    def tick(self, now_ms: int) -> Timestamp:
        """A fresh timestamp for a local write, greater than every earlier one."""
        if now_ms > self._wall:
            self._wall, self._logical = now_ms, 0
        else:
            self._logical += 1
        return Timestamp(self._wall, self._logical, self.node)

    def observe(self, ts: Timestamp, now_ms: int) -> None:
        """Account for a remote timestamp so later local writes order after it."""
        if ts.wall_ms > now_ms + MAX_DRIFT_MS:
            return
        if ts.wall_ms > self._wall:
            self._wall, self._logical = ts.wall_ms, ts.logical
        elif ts.wall_ms == self._wall:
            self._logical = max(self._logical, ts.logical)


__all__ = ["MAX_DRIFT_MS", "HybridClock", "Timestamp"]
