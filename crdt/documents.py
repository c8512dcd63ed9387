"""Handles on named documents, as user code sees them.

A handle is a cheap view (store + name); creating one does not create the
document. Writes are durable when they return and raise ``ValueError`` for
values a CRDT cannot hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from crdt.counter import PNCounter
from crdt.delta import Delta, Op
from crdt.lww import LwwMap
from crdt.messages import DocKind
from crdt.orset import ORSet
from crdt.values import Element, check_name

if TYPE_CHECKING:
    from crdt.store import Store


class _Handle:
    kind: DocKind

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = check_name(name)

    def version(self) -> int:
        return self.store.version(self.name)

    def _commit(self, state: LwwMap | ORSet | PNCounter) -> Delta:
        return self.store.commit([Op(self.kind, self.name, state)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class MapDoc(_Handle):
    """A map of fields, each a last-writer-wins register."""

    kind = DocKind.MAP

    def _state(self) -> LwwMap:
        return self.store.state(DocKind.MAP, self.name) or LwwMap()

    def set(self, key: str, value: Any) -> None:
        self._commit(LwwMap.set_delta(key, value, self.store.tick()))

    def update(self, fields: Mapping[str, Any]) -> None:
        """Set several fields in one delta (atomic: all or none replicate)."""
        delta = LwwMap()
        for key, value in fields.items():
            delta.merge(LwwMap.set_delta(key, value, self.store.tick()))
        if len(delta):
            self._commit(delta)

    def delete(self, key: str) -> None:
        if key in self._state():
            self._commit(LwwMap.delete_delta(key, self.store.tick()))

    def get(self, key: str, default: Any = None) -> Any:
        return self._state().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._state()

    def items(self) -> list[tuple[str, Any]]:
        return self._state().items()

    def keys(self) -> list[str]:
        return [k for k, _ in self.items()]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())


class SetDoc(_Handle):
    """An add-wins observed-remove set."""

    kind = DocKind.ORSET

    def _state(self) -> ORSet:
        return self.store.state(DocKind.ORSET, self.name) or ORSet()

    def add(self, element: Element) -> None:
        self._commit(self._state().add_delta(element, self.store.peer_id.raw))

    def remove(self, element: Element) -> None:
        """Remove every instance this node has seen; concurrent adds survive."""
        state = self._state()
        if element in state:
            self._commit(state.remove_delta(element))

    def contains(self, element: Element) -> bool:
        return element in self._state()

    __contains__ = contains

    def elements(self) -> list[Element]:
        return self._state().elements()

    def __len__(self) -> int:
        return len(self._state())


class CounterDoc(_Handle):
    """A PN-counter."""

    kind = DocKind.COUNTER

    def _state(self) -> PNCounter:
        return self.store.state(DocKind.COUNTER, self.name) or PNCounter()

    def increment(self, amount: int = 1) -> None:
        if amount:
            self._commit(self._state().increment_delta(self.store.peer_id.raw, amount))

    def decrement(self, amount: int = 1) -> None:
        self.increment(-amount)

    def value(self) -> int:
        return self._state().value()


__all__ = ["CounterDoc", "MapDoc", "SetDoc"]
