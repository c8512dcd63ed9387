"""Change notification for trio code: per-name versions, waiters, subscriptions.

Changes coalesce: a subscriber that falls behind sees each changed document
once (in the order of its first pending change), so memory stays bounded by
the number of documents, never by the write rate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from crdt.messages import DocKind


@dataclass(frozen=True)
class Change:
    kind: DocKind
    name: str


class Subscription:
    """Changes to documents whose name starts with ``prefix``; iterate with ``async for``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._pending: dict[Change, None] = {}
        self._event = trio.Event()

    def _push(self, change: Change) -> None:
        if change.name.startswith(self.prefix):
            self._pending[change] = None
            self._event.set()

    def drain(self) -> list[Change]:
        """Every pending change, without waiting."""
        out = list(self._pending)
        self._pending.clear()
        return out

    async def next(self) -> Change:
        while not self._pending:
            self._event = trio.Event()
            await self._event.wait()
        change = next(iter(self._pending))
        del self._pending[change]
        return change

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Change:
        return await self.next()


class ChangeNotifier:
    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self.version = 0
        self._waiters: dict[str, trio.Event] = {}
        self._any: trio.Event | None = None
        self._subs: set[Subscription] = set()

    def version_of(self, name: str) -> int:
        return self._versions.get(name, 0)

    def changed(self, change: Change) -> None:
        """A document's state changed."""
        self._versions[change.name] = self._versions.get(change.name, 0) + 1
        waiter = self._waiters.pop(change.name, None)
        if waiter is not None:
            waiter.set()
        for sub in self._subs:
            sub._push(change)

    def accepted(self) -> None:
        """A delta joined the log (even one that lost every LWW race)."""
        self.version += 1
        if self._any is not None:
            self._any.set()
            self._any = None

    async def wait_changed(self, name: str, version: int) -> int:
        """Wait until ``name``'s version exceeds ``version``; returns the new version."""
        while self.version_of(name) <= version:
            await self._waiters.setdefault(name, trio.Event()).wait()
        return self.version_of(name)

    async def wait_any(self, version: int) -> int:
        """Wait until the store-wide version (accepted deltas) exceeds ``version``."""
        while self.version <= version:
            if self._any is None:
                self._any = trio.Event()
            await self._any.wait()
        return self.version

    @asynccontextmanager
    async def subscribe(self, prefix: str = "") -> AsyncIterator[Subscription]:
        sub = Subscription(prefix)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)


__all__ = ["Change", "ChangeNotifier", "Subscription"]
