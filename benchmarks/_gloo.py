"""torch.distributed gloo all-reduce baseline, run in its own processes."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import socket
import statistics
import time
from typing import Any
from unittest.mock import patch

from _ccshim import SYSTEM, preload_env


def _worker(rank: int, world: int, port: int, elements: int, iters: int, q: Any) -> None:
    import torch
    import torch.distributed as dist

    from peerd.datasock import running_congestion

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from peerd.peerproc import cpu_times, reset_rss_peak, rss_now, rss_peak

    dist.all_reduce(torch.ones(4096))  # warm-up: connections
    t = torch.full((elements,), float(rank + 1), dtype=torch.float32)
    dist.barrier()
    # Like peerd's: the first full-size all-reduce is measured for memory, not timed.
    gc.collect()
    base = rss_now() if reset_rss_peak() else rss_peak()
    dist.all_reduce(t)
    peak = max(0, rss_peak() - base)
    times = []
    cpu = []
    for _ in range(iters):
        t.fill_(float(rank + 1))
        dist.barrier()
        t0, (user0, sys0, faults0) = time.perf_counter(), cpu_times()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
        user1, sys1, faults1 = cpu_times()
        cpu.append((user1 - user0 + sys1 - sys0, user1 - user0, sys1 - sys0, faults1 - faults0))
    expected = world * (world + 1) / 2
    ok = bool(torch.all(t == expected))
    with socket.socket() as probe:  # what gloo's own TCP sockets were given
        congestion = running_congestion(probe)
    q.put((rank, times, peak, ok, sorted(cpu)[len(cpu) // 2],  # median by total CPU
           congestion))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_gloo(world: int, elements: int, iters: int, port: int = 0,
             congestion: str = SYSTEM) -> dict[str, Any]:
    """Median/min seconds per all-reduce over ``world`` processes, peak extra RSS,
    the median CPU seconds one process spends in an all-reduce (the rank that
    spends most; total, user and kernel), and the TCP congestion control its
    sockets ran (``congestion`` where ``_ccshim`` could arrange it)."""
    # A fixed port may be taken by anyone's torch.distributed store on a shared
    # machine (the workers would then wait on a stranger forever): pick a free one.
    port = port or _free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, elements, iters, q))
             for r in range(world)]
    # The spawned workers' environment, not this process's sockets.
    with patch.dict(os.environ, preload_env(congestion)):
        for p in procs:
            p.start()
    results: list[Any] = []
    deadline = time.monotonic() + 600
    while len(results) < world:
        try:
            results.append(q.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"gloo workers failed or hung (exit codes {dead})") from None
    for p in procs:
        p.join(timeout=60)
    if not all(r[3] for r in results):
        raise RuntimeError("gloo produced a wrong sum")
    # The same statistic as peerd's: an all-reduce lasts until its slowest rank is
    # done, and the median is taken over the all-reduces.
    per_iter = [max(r[1][i] for r in results) for i in range(iters)]
    return {
        "min_s": min(per_iter),
        "median_s": statistics.median(per_iter),
        "peak_extra_bytes": max(r[2] for r in results),
        "peaks": [r[2] for r in sorted(results, key=lambda r: r[0])],  # by rank
        **dict(zip(("cpu_s", "user_s", "sys_s", "faults"), max(r[4] for r in results),
                   strict=True)),
        "congestion": ",".join(sorted({r[5] for r in results})),
    }


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(run_gloo(4, 10_000_000, 3))
