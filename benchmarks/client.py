"""Client hand-off cost and idle daemon footprint.

1. Hand a 100M-element fp32 tensor (400 MB) to a real daemon process and back
   through the shared-memory path (an echo control op: the daemon maps the
   tensor, the client copies it in and the result back out), against numpy
   copying the same bytes once inside one process (one thread, one copy: the
   hand-off copies every byte twice, on ``--copy-threads`` threads). The source
   is an ordinary numpy array (and, in a second line, a torch tensor), not in
   shared memory; the hand-off is timed in steady state (the client's staging
   segment is pooled from the first call on). Also the zero-copy path
   (``client.empty``), where nothing is copied.
2. Resident memory and CPU time of an idle daemon with 50 connected peers (50
   real nodes in one helper process), sampled over ``--idle-seconds``.

The LAST line is the ratio hand-off round trip / one in-process numpy copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], and benchmarks/crdt.py, nat.py
# would shadow the packages of the same name: take the folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np
import torch

from peerd.daemon.launcher import start_daemon
from peerd.identity import SwarmKey

N = 100_000_000
REPEAT = 5


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fn, repeat: int = REPEAT) -> float:  # type: ignore[no-untyped-def]
    return min(timed(fn) for _ in range(repeat))


def interleaved(fns, repeat: int) -> list[list[float]]:  # type: ignore[no-untyped-def]
    """Sorted times of each of ``fns``, run in turn ``repeat`` times: on a machine
    shared with other work, the compared figures see the same load."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            times[i].append(timed(fn))
    return [sorted(t) for t in times]


def ms(times: list[float]) -> str:
    """Best (what the ratio uses) and median of sorted ``times``, in ms."""
    return f"{times[0] * 1e3:8.1f} ms (median {times[len(times) // 2] * 1e3:.1f})"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peers_helper(key_path: str, target: str, count: int) -> None:
    """Run ``count`` in-process nodes connected to ``target`` until stdin closes."""
    import trio

    from peerd.node import open_node

    async def main() -> None:
        key = SwarmKey.load(Path(key_path))
        async with trio.open_nursery() as nursery:
            async def one(task_status: trio.TaskStatus[None]) -> None:
                async with open_node(key, listen=("127.0.0.1", 0), bootstrap=[target]):
                    task_status.started()
                    await trio.sleep_forever()

            for _ in range(count):
                await nursery.start(one)
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)


def idle_footprint(work: Path, key: Path, peers: int, seconds: float) -> None:
    d = start_daemon(work / "idle", key)
    helper = subprocess.Popen(
        [sys.executable, __file__, "--peers-helper", str(key), d.listen, str(peers)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout is not None and helper.stdin is not None
        line = helper.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"peer helper failed: {line!r}")
        with d.client() as client:
            connected = len(client.peers())
        rss0, cpu0, t0 = rss_kib(d.pid), cpu_seconds(d.pid), time.monotonic()
        time.sleep(seconds)
        rss1, cpu1, t1 = rss_kib(d.pid), cpu_seconds(d.pid), time.monotonic()
        with d.client() as client:
            still = len(client.peers())
        print(f"idle daemon, {connected} peers connected ({still} after {t1 - t0:.0f} s): "
              f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, CPU {cpu1 - cpu0:.2f} s "
              f"over {t1 - t0:.1f} s ({100 * (cpu1 - cpu0) / (t1 - t0):.2f}% of one core)")
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        try:
            helper.wait(20)
        except subprocess.TimeoutExpired:
            helper.kill()
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=N)
    ap.add_argument("--peers", type=int, default=50)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--copy-threads", type=int, default=None,
                    help="client copy threads (default: usable CPUs, at most 4)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pdb", dir="/tmp"))
    key = work / "swarm.key"
    SwarmKey.generate().save(key)
    try:
        src = np.random.default_rng(0).standard_normal(args.elements, dtype=np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        alloc_copy_s = best_of(lambda: src.copy())
        d = start_daemon(work / "d", key)
        try:
            with d.client(copy_threads=args.copy_threads) as client, \
                    d.client(copy_threads=1) as single:
                threads = client._copier.threads
                single.echo(src)
                t0 = time.perf_counter()
                client.echo(src)
                first_s = time.perf_counter() - t0
                tensor = torch.from_numpy(src.copy())
                client.echo(tensor)
                copy_t, handoff_t, torch_t, single_t = interleaved([
                    lambda: np.copyto(dst, src), lambda: client.echo(src),
                    lambda: client.echo(tensor), lambda: single.echo(src)], 2 * REPEAT + 1)
                copy_s, handoff_s, single_s = copy_t[0], handoff_t[0], single_t[0]
                shared = client.share(src)
                zero_s = best_of(lambda: client.echo(shared))
                # the data really travels: the daemon flips bits, we see them
                check = src.copy()
                client.echo(check, mode=2)
                assert not np.array_equal(check.view(np.uint32), src.view(np.uint32))
                client.echo(check, mode=2)
                assert np.array_equal(check.view(np.uint32), src.view(np.uint32))
        finally:
            d.stop()
        gb = src.nbytes / 1e9
        print(f"tensor: {args.elements} fp32 = {src.nbytes / 2**20:.0f} MiB")
        print(f"numpy copy into existing array:  {ms(copy_t)} "
              f"{gb / copy_s:.1f} GB/s, one thread")
        print(f"numpy copy into new array:       {alloc_copy_s * 1e3:8.1f} ms")
        print(f"daemon hand-off, first call:     {first_s * 1e3:8.1f} ms (new segment)")
        print(f"daemon hand-off and back:        {ms(handoff_t)} copy in + control round "
              f"trip + copy back on {threads} copy threads, {2 * gb / handoff_s:.1f} GB/s copied")
        print(f"same, torch tensor:              {ms(torch_t)}")
        print(f"same, copies on one thread:      {ms(single_t)} ratio {single_s / copy_s:.2f}")
        print(f"daemon hand-off, shared array:   {zero_s * 1e3:8.1f} ms (zero-copy)")
        if args.peers > 0 and args.idle_seconds > 0:
            idle_footprint(work, key, args.peers, args.idle_seconds)
        print(f"ratio hand-off round trip / numpy copy: {handoff_s / copy_s:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peers-helper"]:
        peers_helper(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
