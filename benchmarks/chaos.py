"""Chaos soak on demand: real peer processes all-reduce while peers are killed
at named phases, stalled with SIGSTOP and new ones join; with ``--diloco``,
real daemons and training processes train the tiny GPT with DiLoCo instead.

Prints every step, then faults injected and survived, recovery-time
percentiles, rounds that had to be rerun (lost work) and invariant
violations. The LAST line is faults survived / faults injected.

    python benchmarks/chaos.py --seconds 600 --seed 1
    python benchmarks/chaos.py --diloco --seconds 600
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The repository root, so the harness under tests/ imports; the script folder
# itself is taken off the path (its crdt.py/nat.py would shadow the packages).
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from tests.chaos.diloco_soak import run_diloco_soak  # noqa: E402
from tests.chaos.soak import run_soak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--diloco", action="store_true",
                    help="train with DiLoCo across daemons instead of bare all-reduce rounds")
    args = ap.parse_args()
    if args.diloco:
        report, curve = run_diloco_soak(args.seconds, seed=args.seed, start_peers=args.peers,
                                        log=print)
        if curve:
            print(f"held-out loss over {len(curve)} agreed outer steps: "
                  f"{curve[0]:.3f} -> {curve[-1]:.3f}")
    else:
        report = run_soak(args.seconds, seed=args.seed, start_peers=args.peers, log=print)
    print(report.summary())
    print(f"recovery seconds: p50 {report.percentile(50):.2f} p90 {report.percentile(90):.2f} "
          f"p99 {report.percentile(99):.2f} max {max(report.recoveries, default=0.0):.2f}")
    print(f"lost work: {report.lost_rounds} round(s) rerun after an error, "
          f"0 results lost" if not report.violations else "")
    for v in report.violations:
        print("VIOLATION:", v)
    ratio = report.faults_survived / max(1, report.faults_injected)
    print(f"faults survived / injected: {report.faults_survived}/{report.faults_injected} "
          f"= {ratio:.3f}")


if __name__ == "__main__":
    main()
