"""The check every multi-process all-reduce test makes of one round's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from peerd.peerproc import LocalSwarm


def check_round(sw: LocalSwarm, results: list[dict[str, Any]], seed: int, rnd: int, size: int,
                out: Path, op: str = "avg", rtol: float = 1e-5) -> None:
    """Every peer got a result over the same participants, the same bytes, and
    each participant's saved output (``out``) equals the float64 reference."""
    assert all(r["event"] == "result" for r in results), results
    participants = results[0]["participants"]
    assert all(r["participants"] == participants for r in results)
    assert len({r["sha256"] for r in results}) == 1, "results differ between peers"
    ref = sw.reference(participants, seed, rnd, size, op)
    for peer in participants:
        got = np.load(out / f"r{rnd}_{sw.by_peer(peer).index}.npy")
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-6)
