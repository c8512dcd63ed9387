"""A small all-reduce started while a large one (another tag) is in flight.

Streaming DiLoCo and async outer steps run collectives of several tags at
once; a small one's messages (its blocks, histories and status reports) then
share the data links with a large one's stripes. This measures how long a
1000-element all-reduce takes alone and while a large one runs, with the
data sockets' unsent bytes bounded (``NodeConfig.data_notsent_lowat``, the
default) and with the kernel's default (unbounded: a whole send buffer).

Four real nodes in one process, in a network namespace of its own whose
loopback is shaped by tc tbf (root; the namespace is removed on exit), so
the large transfer fills a slow link as it would across the internet:

    sudo python benchmarks/small_behind_large.py                 # 200mbit, 2M elements
    sudo python benchmarks/small_behind_large.py --rate 100mbit --trials 8

Session 23 (2 cores, 200 Mbit/s, 2M fp32 large, 5 trials each, medians):
small alone 6.6-7.1 ms; during the large one 0.94 s with 256 KiB unsent at
most against 1.39 s with the kernel's default (ratio 0.67; an earlier run of
the same measurement: 0.82 against 1.54 s); the large one 1.93 s either way.
What is left is the stripe each hop waits for on the wire (a whole stripe
goes before the next message on its connection).

Session 24: stripes are cut to take about ``LinkConfig.stripe_seconds``
(0.05 s) at the pace the link's last stripes drained. Bounded, small during
large: 0.68-0.79 s in five runs (median 0.72), against 0.78-0.94 s in eight
with stripes cut by size alone; three interleaved pairs 0.72/0.83, 0.72/0.80,
0.70/0.93. The rest is the tbf queue (50 ms per hop), the unsent bytes ahead
in each socket (a 64 KiB bound took it to 0.54-0.65 s, at the price of four
times the write wakeups on fast links) and the shorter stripe still ahead.
Session 25: below that bound each channel holds what it sends in about
``LinkConfig.unsent_seconds`` (0.02 s) at the link's pace (here 32-64 KiB).
Three interleaved pairs against the code before, bounded, small during
large: 0.57/0.77, 0.64/0.73, 0.60/0.76 s (and 0.54 in a first run); the large
one 1.93 s either way; the shaped ring's share of the link
(``allreduce.py --netns``) stayed 0.95 at 200 Mbit/s (two pairs), 0.96 at 100
(two pairs) and 0.96 at 50 (one pair, 4M elements), where the channels hold
32-64 KiB; the loopback ratios moved within their noise.
On loopback stripes stay at ``part_size`` (4 MiB; 10M and 100M: 7 sends of
2712 cut finer, one of them into more stripes), and the large transfer's
time did not move.
The last line is the ratio bounded / unbounded of the small one's time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import trio  # noqa: E402

from collectives.driver import EngineConfig  # noqa: E402
from collectives.membership import Timing  # noqa: E402
from peerd.config import NodeConfig  # noqa: E402
from peerd.identity import SwarmKey  # noqa: E402
from peerd.node import open_node  # noqa: E402

KEY = SwarmKey(b"b" * 32)
RUN = "small-behind-large"
SMALL = 1000
START_AFTER = 0.3  # seconds into the large all-reduce


async def _each(nodes: list, fn) -> list:  # type: ignore[no-untyped-def, type-arg]
    out: list = [None] * len(nodes)  # type: ignore[type-arg]

    async def one(i: int) -> None:
        out[i] = await fn(i, nodes[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(nodes)):
            nursery.start_soon(one, i)
    return out


async def measure(lowat: int, large: int, trials: int) -> tuple[float, float, float]:
    """(small alone, small during the large one, the large one), medians in seconds."""
    cfg = NodeConfig(data_notsent_lowat=lowat)
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_node(KEY, config=cfg)) for _ in range(4)]
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                await a.connect(b.listen_address)
        ids = [n.peer_id.text for n in nodes]
        # One process, one event loop, a shaped link: patient heartbeats.
        patient = EngineConfig(timing=Timing(heartbeat_interval=1.0, heartbeat_timeout=30.0,
                                             view_timeout=60.0))
        await _each(nodes, lambda i, n: n.join_run(RUN, ids, config=patient))
        big = [np.ones(large, np.float32) for _ in nodes]
        small = [np.ones(SMALL, np.float32) for _ in nodes]

        async def reduce(arrays: list[np.ndarray], tag: str) -> float:
            t = time.perf_counter()
            await _each(nodes, lambda i, n: n.all_reduce(RUN, arrays[i], op="avg", tag=tag))
            return time.perf_counter() - t

        await reduce(big, "large")
        await reduce(small, "small")
        alone = [await reduce(small, "small") for _ in range(trials)]
        during, larges = [], []
        for _ in range(trials):
            async with trio.open_nursery() as nursery:
                async def run_large() -> None:
                    larges.append(await reduce(big, "large"))

                nursery.start_soon(run_large)
                await trio.sleep(START_AFTER)
                during.append(await reduce(small, "small"))
    return statistics.median(alone), statistics.median(during), statistics.median(larges)


def _inner(args: argparse.Namespace) -> None:
    default = NodeConfig.data_notsent_lowat
    got = {}
    for name, lowat in (("bounded", default), ("kernel default", 0)):
        alone, during, large = trio.run(measure, lowat, args.elements, args.trials)
        got[name] = during
        print(f"{name:>15} (notsent_lowat {lowat}): small alone {alone * 1e3:.1f} ms, "
              f"during the large one {during * 1e3:.1f} ms; large {large * 1e3:.0f} ms",
              flush=True)
    print(f"ratio small-during-large time, bounded / kernel default: "
          f"{got['bounded'] / got['kernel default']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="200mbit", help="tc tbf rate of the namespace's loopback")
    ap.add_argument("--elements", type=int, default=2_000_000, help="fp32 elements of the large")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        _inner(args)
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes a network namespace and shapes its loopback")
    ns = f"pdsbl{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def run(*cmd: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)

        run("ip", "link", "set", "lo", "up")
        run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", args.rate,
            "burst", "256kb", "latency", "50ms")
        run(sys.executable, str(Path(__file__).resolve()), "--inner", "--elements",
            str(args.elements), "--trials", str(args.trials))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
