"""torch.distributed gloo all-reduce baseline, run in its own processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from typing import Any


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(rank: int, world: int, port: int, elements: int, iters: int, q: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    t = torch.full((elements,), float(rank + 1), dtype=torch.float32)
    dist.all_reduce(t)  # warm-up: connections and buffers
    dist.barrier()
    base = _rss_peak_bytes()
    times = []
    for _ in range(iters):
        t.fill_(float(rank + 1))
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    expected = world * (world + 1) / 2
    ok = bool(torch.all(t == expected))
    q.put((rank, min(times), sorted(times)[len(times) // 2], max(0, _rss_peak_bytes() - base), ok))
    dist.destroy_process_group()


def run_gloo(world: int, elements: int, iters: int, port: int) -> dict[str, float]:
    """Median/min seconds per all-reduce over ``world`` processes, and peak extra RSS."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, elements, iters, q))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if not all(r[4] for r in results):
        raise RuntimeError("gloo produced a wrong sum")
    return {
        "min_s": max(r[1] for r in results),
        "median_s": max(r[2] for r in results),
        "peak_extra_bytes": max(r[3] for r in results),
    }


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(run_gloo(4, 10_000_000, 3, 29511))
