"""Averaging a pseudo-gradient across members, started now and finished later.

``start_average`` either all-reduces the dense fp32 tensor (async handle of the
collective) or, for compressed payloads, all-gathers each member's encoded
bytes and averages the decoded tensors in view order in fp32 (docs/
optimizers.md §2.5 option 1: exact with respect to the quantised inputs).
The blocking ``all_gather`` runs on a helper thread so the training loop can
keep stepping; members issue no other collective before ``finish``, so the
operation order every member sees is unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from collectives.api import Collective, Handle, Quant, ReduceOp
from peerd.errors import PeerLost, ProtocolError

Decode = Callable[[np.ndarray], torch.Tensor]
JOIN_TIMEOUT = 600.0  # seconds; a gather that takes longer is a hung collective


@dataclass(frozen=True)
class Averaged:
    value: torch.Tensor  # fp32 average over ``participants``
    participants: tuple[str, ...]
    bytes_sent: int
    bytes_received: int
    rejected: int = 0  # payloads dropped as malformed


class Pending:
    """An average in flight; ``finish()`` returns it or raises (e.g. ``PeerLost``)."""

    def __init__(self) -> None:
        self._handle: Handle | None = None
        self._dense: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._result: Averaged | None = None
        self._error: BaseException | None = None

    @classmethod
    def from_handle(cls, handle: Handle, dense: torch.Tensor) -> Pending:
        p = cls()
        p._handle, p._dense = handle, dense
        return p

    @classmethod
    def run(cls, fn: Callable[[], Averaged], *, background: bool) -> Pending:
        p = cls()
        if background:
            p._thread = threading.Thread(target=p._call, args=(fn,), daemon=True)
            p._thread.start()
        else:
            p._call(fn)
        return p

    def _call(self, fn: Callable[[], Averaged]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:
            self._error = exc

    def finish(self) -> Averaged:
        if self._handle is not None and self._dense is not None:
            res = self._handle.wait()
            return Averaged(self._dense, res.participants, res.bytes_sent, res.bytes_received)
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                raise PeerLost([], "all_gather did not finish")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def start_dense(collective: Collective, delta: torch.Tensor, *, tag: str, retry: bool,
                quant: Quant = Quant.NONE) -> Pending:
    handle = collective.all_reduce_async(delta, ReduceOp.AVG, tag=tag, quant=quant, retry=retry)
    return Pending.from_handle(handle, delta)


def gather_average(
    collective: Collective, payload: np.ndarray, decode: Decode, *, tag: str, retry: bool = True
) -> Averaged:
    """All-gather ``payload`` and average the decoded peers' tensors (blocking). With
    ``retry=False`` a lost member raises ``PeerLost`` on every survivor."""
    arrays, peers = collective.all_gather(payload, tag=tag, retry=retry)
    return average_payloads(arrays, peers, decode, own_size=payload.size)


def average_payloads(
    arrays: Sequence[Any], peers: tuple[str, ...], decode: Decode, *, own_size: int
) -> Averaged:
    """Sum decoded payloads in view order (fp32), divide by how many decoded."""
    acc: torch.Tensor | None = None
    used: list[str] = []
    received = 0
    for arr, peer in zip(arrays, peers, strict=True):
        raw = np.asarray(arr)
        received += raw.nbytes
        try:
            value = decode(raw)
        except ProtocolError:
            continue
        acc = value.clone() if acc is None else acc.add_(value)
        used.append(peer)
    if acc is None:
        raise PeerLost(peers, "no valid payload in the gather")
    if len(used) > 1:
        acc /= float(len(used))
    n = len(peers)
    return Averaged(
        acc, tuple(used), own_size * (n - 1), received - own_size, rejected=n - len(used)
    )


def start_gather(collective: Collective, payload: np.ndarray, decode: Decode, *, tag: str,
                 background: bool, retry: bool = True) -> Pending:
    return Pending.run(
        lambda: gather_average(collective, payload, decode, tag=tag, retry=retry),
        background=background,
    )
