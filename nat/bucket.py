"""Token bucket rate limiter (pure; time is passed in).

``reserve`` always books the bytes and returns how long the caller must wait
before sending them; the bucket may go into debt, which later reservations pay
back. This lets a driver forward chunks larger than the burst size while the
long-run rate still never exceeds ``rate``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BucketStats:
    rate: float
    burst: float
    tokens: float
    reserved_total: int


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now
        self._reserved = 0

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Book ``n`` units; returns the delay (seconds, >= 0) before sending them."""
        if n < 0:
            raise ValueError("negative reservation")
        self._refill(now)
        self._tokens -= n
        self._reserved += n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def available(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def statistics(self) -> BucketStats:
        return BucketStats(self.rate, self.burst, self._tokens, self._reserved)
