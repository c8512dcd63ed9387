"""Ring reduce-scatter and all-gather schedules (pure).

Ranks ``0..R-1`` sit on a ring; rank ``i`` sends to ``i+1`` and receives from
``i-1``. Chunk ``c`` starts its reduction at rank ``c`` and travels forward, so
its partial sum after ``k`` hops is ``x_c + x_{c+1} + ... + x_{c+k}`` added in
exactly that order: the summation order is a function of the view alone.
After ``R-1`` reduce-scatter steps rank ``i`` holds the complete chunk
``i+1``; it is that chunk's *owner*, produces its final bytes once, and the
all-gather carries those bytes around the ring unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One ring step at one rank: the chunk sent right and the chunk received from the left."""

    send: int
    recv: int


def _check(rank: int, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for ring of {size}")


def right(rank: int, size: int) -> int:
    _check(rank, size)
    return (rank + 1) % size


def left(rank: int, size: int) -> int:
    _check(rank, size)
    return (rank - 1) % size


def owned_chunk(rank: int, size: int) -> int:
    """The chunk whose fully reduced value ``rank`` produces."""
    _check(rank, size)
    return (rank + 1) % size


def owner_of(chunk: int, size: int) -> int:
    _check(chunk, size)
    return (chunk - 1) % size


def reduce_scatter_schedule(rank: int, size: int) -> tuple[Step, ...]:
    """Step ``s``: send the partial of chunk ``rank - s``, receive chunk ``rank - s - 1``.

    The chunk received at step ``s`` is the one sent at step ``s + 1``; the
    chunk received at the last step is ``owned_chunk(rank)``.
    """
    _check(rank, size)
    return tuple(Step((rank - s) % size, (rank - s - 1) % size) for s in range(size - 1))


def all_gather_schedule(rank: int, size: int) -> tuple[Step, ...]:
    """Step ``s``: send final chunk ``rank + 1 - s``, receive final chunk ``rank - s``.

    Step 0 sends the owned chunk; later steps forward what was received the
    step before. The chunk received at the last step is not forwarded (its
    owner is the right neighbour).
    """
    _check(rank, size)
    return tuple(Step((rank + 1 - s) % size, (rank - s) % size) for s in range(size - 1))


def reduction_order(chunk: int, size: int) -> tuple[int, ...]:
    """Ranks whose inputs are added into ``chunk``, in the order they are added."""
    _check(chunk, size)
    return tuple((chunk + k) % size for k in range(size))
