"""Engines over one MemNetwork, each killable; helpers for shared-state tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from collectives.memfabric import MemFabric
from collectives.statebuf import capture, describe
from tests.collectives.conftest import (
    FAST,
    Swarm,
    WrappedFabric,
    ids,
    mock_clock,
    one_view_per_revision,
    run_while_p00_is_stranded,
    swarm,
)

# The engine swarm is the collectives tests' one; only state helpers live here.
__all__ = ["FAST", "CorruptingFabric", "Swarm", "digest_of", "ids", "make_state", "mock_clock",
           "one_view_per_revision", "run_while_p00_is_stranded", "swarm"]


def make_state(seed: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(n).astype(np.float32) for name, n in sizes.items()}


def digest_of(state: dict[str, Any]) -> dict[str, bytes]:
    """Per-tensor content digests (what sync compares)."""
    return {n: describe(r).digest for n, r in capture(state).items()}


class CorruptingFabric(WrappedFabric):
    """A fabric that flips one byte of every state piece it serves."""

    def __init__(self, inner: MemFabric) -> None:
        super().__init__(inner)
        self.corrupted = 0

    async def send_data(self, peer: str, key: bytes, data: Any) -> None:
        if key.startswith(b"ss/") and key[-1:].isdigit():  # a piece, not a control message
            buf = bytearray(data)
            if buf:
                buf[len(buf) // 2] ^= 0xFF
                self.corrupted += 1
            data = bytes(buf)
        await self._inner.send_data(peer, key, data)
