"""All-reduce data-path knobs compared round by round on one swarm, against gloo.

Between two benchmark runs the same machine drifts by more than most knobs
move the time (on the 16-core host: 10M fp32 took peerd 0.049-0.114 s over
separate runs within one hour), so knobs are compared on one set of 4 peer
processes: each timed round first sets every peer's knobs (the ``tune``
command of ``peerd.peerproc``), and the variants take turns, round after
round. Then gloo runs once on the same size.

    python benchmarks/allreduce_knobs.py --elements 10000000 --rounds 8 \\
        --variants '{"default": {}, "ahead8": {"send_ahead": 8}}'

Knobs (the defaults are the code's): ``switch_interval`` (the GIL's, seconds),
``send_ahead``, ``receive_ahead``, ``thread_min``, ``commit_threads``
(``collectives.allreduce``), ``sub_chunk_bytes`` (the engine's) and
``native`` (1: the native record loops, 0: the Python ones). Settings
fixed when a peer starts (data channels per link, worker threads) take the
environment (``PEERD_PEERPROC_DATA_CHANNELS``, ``PEERD_PEERPROC_DATA_THREADS``)
and a run of their own.

Measured on the 16-core H100 host (session 13, 10M fp32, 8 rounds each, median
of the slowest peer; gloo 29.1 ms): GIL switch interval 0.2 ms 49.7 ms,
Python's 5 ms 50.0, 50 us 53.0; send_ahead 8 50.0; one 10 MB block per chunk
50.5; 8 commit threads 53.9; reductions on the event loop 52.8: none moves
the time beyond the noise. 4 channels per link: 56.3 (gloo 20.2 in that run); no worker
threads: 65.6 (gloo 24.9). The LAST line is the default's ratio to gloo.

``--netns 200mbit`` runs the peers in network namespaces with shaped
uplinks and prints bus bandwidth / link limit per variant instead. Session
15, 10M fp32, 4 rounds each, 2 cores: default (5 MB blocks) 0.908, 1 MiB
blocks 0.909, 2 MiB 0.886, send_ahead 2 0.909: the ring's pipelining is not
what stands between it and the link. Each full-size packet carries 66 bytes
of Ethernet, IP and TCP headers (with timestamps) and each uplink also
carries the ACKs of the data coming in, so TCP payload tops out near
0.94-0.96 of the shaped rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# As in allreduce.py: this folder must not shadow the packages of the same name.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
sys.path.append(str(_HERE))

from _gloo import run_gloo  # noqa: E402
from _netns import netns_factory  # noqa: E402

from collectives import allreduce as ring  # noqa: E402
from collectives.driver import EngineConfig  # noqa: E402
from peerd import datapump  # noqa: E402
from peerd.config import NodeConfig  # noqa: E402
from peerd.peerproc import LocalSwarm  # noqa: E402

# Every knob a variant leaves out takes the code's own value (read here, so the
# reference cannot drift from what the engine runs with).
DEFAULTS = {"switch_interval": sys.getswitchinterval(), "send_ahead": ring.SEND_AHEAD,
            "receive_ahead": ring.RECEIVE_AHEAD, "thread_min": ring.THREAD_MIN,
            "commit_threads": ring.COMMIT_THREADS,
            "sub_chunk_bytes": EngineConfig().sub_chunk_bytes,
            "native": int(datapump.available())}


def measure(elements: int, rounds: int, variants: dict[str, dict[str, float]],
            factory: Any = None) -> dict[str, list[dict[str, float]]]:
    """Per variant, the slowest peer's seconds and phases of each of its rounds."""
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with LocalSwarm(4, factory=factory) as sw:
        # Open every link, then touch this size once (memory, scratch pool).
        for i, size in enumerate((4096, elements)):
            sw.all_reduce(sw.peers, size=size, seed=1, round=i, timeout=300)
        rnd = 2
        for _ in range(rounds):
            for name, knobs in variants.items():
                for p in sw.peers:
                    p.send(cmd="tune", run=sw.run, **{**DEFAULTS, **knobs})
                for p in sw.peers:
                    p.expect("tuned", timeout=60)
                res = sw.all_reduce(sw.peers, size=elements, seed=1, round=rnd, timeout=300,
                                    start_in=0.05)
                rnd += 1
                bad = [r for r in res if r["event"] != "result"]
                if bad or len({r["sha256"] for r in res}) != 1:
                    raise RuntimeError(f"variant {name}: failed or differing results: {res}")
                slowest = max(res, key=lambda r: r["seconds"])
                seen[name].append({"seconds": slowest["seconds"], **slowest["phases"]})
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=8, help="rounds per variant")
    ap.add_argument("--variants", default='{"default": {}, "ahead8": {"send_ahead": 8}}',
                    help="JSON: name -> knobs; the first is the reference")
    ap.add_argument("--netns", metavar="RATE",
                    help="peers in network namespaces, each uplink shaped to RATE (e.g. "
                         "200mbit; root): prints bus bandwidth / limit instead of gloo")
    args = ap.parse_args()
    variants = json.loads(args.variants)
    unknown = {k for knobs in variants.values() for k in knobs} - set(DEFAULTS)
    if unknown:
        ap.error(f"unknown knobs {sorted(unknown)}; use {sorted(DEFAULTS)}")
    if args.netns:
        lab, factory = netns_factory(args.netns)
        try:
            seen = measure(args.elements, args.rounds, variants, factory)
        finally:
            lab.close()
        limit = float(args.netns.removesuffix("mbit")) * 1e6 / 8
        print(f"{args.elements:,} fp32, 4 peers, uplinks {args.netns}, {args.rounds} "
              "interleaved rounds per variant; bus bandwidth / link limit:")
        for name, rows in seen.items():
            med = statistics.median(r["seconds"] for r in rows)
            print(f"{name:>14}: median {med * 1e3:7.1f} ms  "
                  f"{2 * 3 / 4 * args.elements * 4 / med / limit:.3f}")
        return 0
    seen = measure(args.elements, args.rounds, variants)
    # gloo's sockets on peerd's congestion control (``_ccshim``), as in allreduce.py.
    gloo = run_gloo(4, args.elements, 9, congestion=NodeConfig.data_congestion)["median_s"]
    print(f"{args.elements:,} fp32, 4 peers, {args.rounds} interleaved rounds per variant; "
          f"gloo median {gloo * 1e3:.1f} ms")
    for name, rows in seen.items():
        med = statistics.median(r["seconds"] for r in rows)
        split = " ".join(f"{k} {statistics.median(r[k] for r in rows) * 1e3:.1f}"
                         for k in rows[0] if k != "seconds")
        print(f"{name:>14}: median {med * 1e3:7.1f} ms  min "
              f"{min(r['seconds'] for r in rows) * 1e3:7.1f}  ratio {med / gloo:.2f}  [{split}]")
    first = next(iter(seen))
    ratio = statistics.median(r["seconds"] for r in seen[first]) / gloo
    print(f"ratio peerd-time / gloo-time ({first}, {args.elements:,} fp32): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
