"""Helpers to drive several members in threads (tests, examples, benchmarks) and
to fingerprint shared state for bit-parity checks."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar, cast

import torch

T = TypeVar("T")

JOIN_TIMEOUT = 600.0  # seconds; a member thread that runs longer is reported as hung


def run_threads(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(i)`` for i in range(n), each in its own thread; re-raise the first
    error. torch intra-op threads are set to 1 so n members share cores fairly."""
    torch.set_num_threads(1)
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"member-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        if t.is_alive():
            raise TimeoutError(f"{t.name} did not finish within {JOIN_TIMEOUT} s")
    if errors:
        raise errors[0]
    return cast(list[T], results)


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the name-sorted bytes of every tensor (the parity hash of the spec)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + b"\0")
        h.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    return state_fingerprint(dict(model.named_parameters()))
