"""Learn this node's public address from what peers observe (sans-I/O).

Every peer that completes a handshake tells us the source address it saw. One
peer may lie or sit on our LAN, so an address is *confirmed* only when at least
``min_observers`` distinct observer IPs report it; votes are counted per
observer IP (many peer ids behind one IP are one vote), and each observer
endpoint keeps only its latest report, so a single peer repeating a claim can
neither confirm nor rewrite our address. The primary address is sticky: a
rival only replaces it with strictly more independent support.

The raw observations (observer endpoint -> what it saw) feed
``nat.classify.classify``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from nat.endpoint import Endpoint

MIN_OBSERVERS = 2
OBSERVATION_TTL = 600.0  # observed addresses change when routers reboot
MAX_OBSERVERS = 64  # bounded memory whatever peers send


@dataclass(frozen=True)
class Observation:
    """``observer`` (the endpoint we sent to) saw our packets come from ``observed``."""

    observer: Endpoint
    observed: Endpoint
    at: float


@dataclass(frozen=True)
class ObservedStats:
    observers: int
    distinct_observer_ips: int
    confirmed: tuple[Endpoint, ...]
    primary: Endpoint | None
    reports_total: int
    primary_changes: int


class ObservedAddresses:
    """Observations for one local socket, with confirmation by independent IPs."""

    def __init__(
        self,
        *,
        min_observers: int = MIN_OBSERVERS,
        ttl: float = OBSERVATION_TTL,
        max_observers: int = MAX_OBSERVERS,
    ) -> None:
        if min_observers < 2:
            raise ValueError("min_observers must be >= 2: one observer is never trusted")
        self._min = min_observers
        self._ttl = ttl
        self._max = max_observers
        # Insertion order doubles as recency order: re-reports move to the end.
        self._by_observer: dict[Endpoint, Observation] = {}
        self._primary: Endpoint | None = None
        self._reports = 0
        self._changes = 0

    def record(self, observer: Endpoint, observed: Endpoint, now: float) -> bool:
        """Store one report; returns True when the primary address changed."""
        self._reports += 1
        self._by_observer.pop(observer, None)
        self._by_observer[observer] = Observation(observer, observed, now)
        while len(self._by_observer) > self._max:
            del self._by_observer[next(iter(self._by_observer))]
        return self._update(now)

    def expire(self, now: float) -> bool:
        """Drop stale observations; returns True when the primary address changed."""
        return self._update(now)

    def observations(self, now: float) -> tuple[Observation, ...]:
        """Fresh observations, oldest first (one per observer endpoint)."""
        self._drop_stale(now)
        return tuple(self._by_observer.values())

    def support(self, now: float) -> dict[Endpoint, int]:
        """Observed endpoint -> number of distinct observer IPs reporting it."""
        self._drop_stale(now)
        ips_per_endpoint: dict[Endpoint, set[str]] = {}
        for obs in self._by_observer.values():
            ips_per_endpoint.setdefault(obs.observed, set()).add(obs.observer.ip)
        return {ep: len(ips) for ep, ips in ips_per_endpoint.items()}

    def confirmed(self, now: float) -> tuple[Endpoint, ...]:
        """Endpoints confirmed by enough distinct observer IPs, best supported first."""
        support = self.support(now)
        good = [ep for ep, n in support.items() if n >= self._min]
        return tuple(sorted(good, key=lambda ep: (-support[ep], ep != self._primary, ep)))

    def primary(self, now: float) -> Endpoint | None:
        self._update(now)
        return self._primary

    def public_ip(self, now: float) -> str | None:
        """The IP that distinct observers agree on, whatever ports they saw.

        A symmetric NAT shows every observer a different port but one IP, so
        the IP can be confirmed even when no endpoint is.
        """
        self._drop_stale(now)
        ips: dict[str, set[str]] = {}
        for obs in self._by_observer.values():
            if not obs.observed.is_lan:
                ips.setdefault(obs.observed.ip, set()).add(obs.observer.ip)
        counts = Counter({ip: len(obs_ips) for ip, obs_ips in ips.items()})
        best = [ip for ip, n in counts.most_common() if n >= self._min]
        if self._primary is not None and self._primary.ip in best:
            return self._primary.ip
        return best[0] if best else None

    def statistics(self) -> ObservedStats:
        observers = tuple(self._by_observer.values())
        support: dict[Endpoint, set[str]] = {}
        for obs in observers:
            support.setdefault(obs.observed, set()).add(obs.observer.ip)
        return ObservedStats(
            observers=len(observers),
            distinct_observer_ips=len({o.observer.ip for o in observers}),
            confirmed=tuple(sorted(ep for ep, s in support.items() if len(s) >= self._min)),
            primary=self._primary,
            reports_total=self._reports,
            primary_changes=self._changes,
        )

    def _drop_stale(self, now: float) -> None:
        cutoff = now - self._ttl
        for key in [k for k, o in self._by_observer.items() if o.at < cutoff]:
            del self._by_observer[key]

    def _update(self, now: float) -> bool:
        support = self.support(now)
        current = support.get(self._primary, 0) if self._primary is not None else 0
        best: Endpoint | None = self._primary if current >= self._min else None
        best_n = current if best is not None else 0
        for ep, n in sorted(support.items()):
            if n >= self._min and n > best_n:
                best, best_n = ep, n
        if best != self._primary:
            self._primary = best
            self._changes += 1
            return True
        return False
