"""The client-side collective contract.

``optim`` and user code program against ``Collective``; it is satisfied by
the daemon client (``peerd.connect()``), by an in-process node's run handle,
and by ``collectives.local.LocalGroup`` (threads in one process, for unit
tests). Arrays are numpy arrays or torch CPU tensors and are reduced in place.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class ReduceOp(enum.IntEnum):
    SUM = 1
    AVG = 2


class Quant(enum.IntEnum):
    """Wire encoding of all-reduce payloads; accumulation is always fp32."""

    NONE = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3


class SyncStrategy(enum.IntEnum):
    """PCCL's shared-state strategies."""

    ENFORCE_POPULAR = 1
    RECEIVE_ONLY = 2
    SEND_ONLY = 3


@dataclass(frozen=True)
class View:
    """A round view: who takes part, in which ring order, at which revision."""

    run: str
    revision: int
    members: tuple[str, ...]  # peer ids (text form), in ring order
    me: str

    @property
    def rank(self) -> int:
        return self.members.index(self.me)

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class AllReduceResult:
    """What one all-reduce did. ``participants`` are exactly the peers whose
    contributions are in the result; an average divides by their count."""

    participants: tuple[str, ...]
    revision: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    attempts: int = 1
    # Where the last attempt's time went, in seconds: the ring ("ring"), the
    # status round that decides it ("status") and the copy into the caller's
    # array ("copy"); empty where the transport does not say (client, local).
    phases: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class SyncResult:
    """Outcome of a shared-state sync."""

    revision: int
    participants: tuple[str, ...]
    tensors_received: tuple[str, ...]
    bytes_received: int
    bytes_sent: int


@runtime_checkable
class Handle(Protocol):
    def wait(self) -> Any: ...
    def done(self) -> bool: ...


@runtime_checkable
class Collective(Protocol):
    """Blocking collective API used by outer optimizers and training loops."""

    def view(self) -> View:
        """The current round view (after the last round boundary)."""
        ...

    def update_view(self) -> View:
        """A round boundary without shared state: agree the next view with every
        member (joiners are admitted here, as at ``sync_state``). Every member
        calls it at the same point of its loop; a member the run went on
        without rejoins here."""
        ...

    def all_reduce(
        self,
        array: Any,
        op: ReduceOp | str = ReduceOp.AVG,
        *,
        tag: str = "default",
        quant: Quant = Quant.NONE,
        retry: bool = True,
        out: Any = None,
    ) -> AllReduceResult:
        """Reduce ``array`` across the view, in place or into ``out`` (same size
        and dtype; ``array`` is then only read). Raises ``PeerLost`` (with
        ``retry=False``) and leaves ``array`` untouched on failure."""
        ...

    def all_reduce_async(
        self,
        array: Any,
        op: ReduceOp | str = ReduceOp.AVG,
        *,
        tag: str = "default",
        quant: Quant = Quant.NONE,
        retry: bool = True,
        out: Any = None,
    ) -> Handle:
        """Start an all-reduce; ``handle.wait()`` returns its ``AllReduceResult``."""
        ...

    def all_gather(
        self, array: Any, *, tag: str = "gather", retry: bool = True
    ) -> tuple[Sequence[Any], tuple[str, ...]]:
        """Every member's ``array`` (shapes may differ), in view order, plus the
        peers they came from. Used for sparse (index, value) exchange. With
        ``retry=False`` a lost member makes every survivor raise ``PeerLost``."""
        ...

    def sync_state(
        self,
        state: Mapping[str, Any],
        revision: int,
        *,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
    ) -> SyncResult:
        """Make every member's named tensors bit-identical to the popular state;
        tensors are overwritten in place."""
        ...
