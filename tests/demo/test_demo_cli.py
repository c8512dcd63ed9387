"""The README's main command, small: real daemons, real trainers, DiLoCo."""

from __future__ import annotations

import subprocess
import sys


def test_peerd_demo_trains_and_ends_bit_identical() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "demo", "--peers", "2", "--steps", "8",
         "--sync-every", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "final parameters bit-identical on every peer: yes" in out
    assert "2 peers, 2 outer rounds" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("p") and "…" in line]
    assert len(rows) == 2
    for row in rows:
        start, end = float(row[1]), float(row[2])
        assert end < start  # training made progress on every peer
