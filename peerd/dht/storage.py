"""Records this node stores for others (sans-I/O).

Every record is validated (signature, limits, expiry, sub-key namespace)
before it is kept. A sub-key belongs to its publisher by rule (see
``records``), so the only slot two publishers can contend for is the shared
plain slot ``(key, None)``: this node keeps the first live claim there. Quotas
bound what any one publisher can make this node hold. Time comes in as ``now``
(wall-clock seconds, the records' time base).
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.dht.records import (
    DEFAULT_RECORD_LIMITS,
    Record,
    RecordLimits,
    Reject,
    subkey_reject,
    validate,
)


@dataclass(frozen=True)
class StoreStatistics:
    records: int
    keys: int
    publishers: int
    accepted: int
    rejected: int
    expired: int


class RecordStore:
    """Signed records by key and subkey, with per-publisher quotas and expiry."""

    def __init__(self, limits: RecordLimits = DEFAULT_RECORD_LIMITS) -> None:
        self.limits = limits
        self._by_key: dict[bytes, dict[bytes | None, Record]] = {}
        self._per_publisher: dict[bytes, int] = {}
        self._count = 0
        self._accepted = 0
        self._rejected: dict[Reject, int] = {}
        self._expired = 0

    def store(self, record: Record, now: float) -> Reject | None:
        """Keep ``record`` if valid and allowed; ``None`` on success, else the reason."""
        reason = self._admit(record, now)
        if reason is not None:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
            return reason
        self._accepted += 1
        return None

    def _admit(self, record: Record, now: float) -> Reject | None:
        # The namespace rule first: a claim on someone else's sub-key is refused as
        # such, whether or not this node holds the owner's record.
        owner_reason = subkey_reject(record.key, record.subkey, record.publisher)
        if owner_reason is not None:
            return owner_reason
        slots = self._by_key.get(record.key)
        current = slots.get(record.subkey) if slots is not None else None
        if current is not None and current.expires_at <= now:
            self._drop(current)
            current = None
        if current is not None:
            if current.publisher != record.publisher:  # only possible in the plain slot
                return Reject.SUBKEY_OWNED
            if record.seq < current.seq or (
                record.seq == current.seq and record.signature != current.signature
            ):
                return Reject.STALE
        else:
            held = self._per_publisher.get(record.publisher, 0)
            if held >= self.limits.max_records_per_publisher:
                return Reject.QUOTA
            if self._count >= self.limits.max_records:
                return Reject.FULL
        reason = validate(record, now, self.limits)
        if reason is not None:
            return reason
        if current is not None:
            self._drop(current)
        self._by_key.setdefault(record.key, {})[record.subkey] = record
        self._per_publisher[record.publisher] = self._per_publisher.get(record.publisher, 0) + 1
        self._count += 1
        return None

    def _drop(self, record: Record) -> None:
        slots = self._by_key.get(record.key)
        if slots is None or slots.get(record.subkey) is not record:
            return
        del slots[record.subkey]
        if not slots:
            del self._by_key[record.key]
        left = self._per_publisher[record.publisher] - 1
        if left:
            self._per_publisher[record.publisher] = left
        else:
            del self._per_publisher[record.publisher]
        self._count -= 1

    def get(self, key: bytes, now: float, limit: int | None = None) -> list[Record]:
        """Live records under ``key`` (at most ``limit``, latest expiry first)."""
        slots = self._by_key.get(key)
        if not slots:
            return []
        live = [r for r in slots.values() if r.expires_at > now]
        if limit is not None and len(live) > limit:
            live.sort(key=lambda r: r.expires_at, reverse=True)
            live = live[:limit]
        return live

    def expire(self, now: float) -> int:
        """Drop every record whose expiry has passed; returns how many."""
        dead = [r for slots in self._by_key.values() for r in slots.values() if r.expires_at <= now]
        for r in dead:
            self._drop(r)
        self._expired += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return self._count

    def rejections(self) -> dict[Reject, int]:
        return dict(self._rejected)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            records=self._count,
            keys=len(self._by_key),
            publishers=len(self._per_publisher),
            accepted=self._accepted,
            rejected=sum(self._rejected.values()),
            expired=self._expired,
        )
