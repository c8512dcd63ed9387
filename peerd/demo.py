"""``peerd demo``: a training swarm on this machine.

Starts N real daemons (``peerd start`` processes) on loopback with a fresh
swarm key, connects them, and runs one training process per daemon that trains
the tiny GPT on the Python standard library's own source through the client
API (``peerd.connect()``), with an outer optimizer from ``optim`` averaging
through the daemons. Prints a progress bar and a summary: loss before/after,
held-out loss, bytes, rounds, and whether every peer ended bit-identical.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from peerd.errors import PeerdError

RUN = "demo"


def _trainer(socket: str, index: int, cfg: Any, progress: Any) -> None:
    import torch

    from examples.train_diloco import train_worker
    from peerd.client import connect

    torch.set_num_threads(1)

    def hook(step: int, outer: Any) -> None:
        progress.put(("step", index, step))

    try:
        with connect(socket, run=RUN, timeout=600) as client:
            result = train_worker(client, cfg, worker=index, hook=hook)
        progress.put(("done", index, result))
    except Exception as exc:  # reported to the parent, which prints and fails
        progress.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total} steps"


def run_demo(peers: int = 4, steps: int = 60, method: str = "diloco",
             sync_every: int = 20) -> int:
    from examples.train_diloco import METHODS, TrainConfig
    from peerd.daemon.launcher import launch_swarm, stop_all

    if peers < 2:
        print("peerd demo needs --peers 2 or more")
        return 2
    if method not in METHODS:
        print(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        return 2
    cfg = replace(TrainConfig(), method=method, steps=steps, sync_every=sync_every,
                  train_bytes=1_000_000, eval_bytes=100_000)
    workdir = Path(tempfile.mkdtemp(prefix="peerd-demo-"))
    daemons = []
    t0 = time.monotonic()
    try:
        print(f"starting {peers} daemons on loopback (data under {workdir}) ...")
        daemons = launch_swarm(peers, workdir)
        members = [d.peer_id for d in daemons]
        for d in daemons:
            with d.client() as c:
                c.join(members, run=RUN)
            print(f"  {d.peer_id[:12]}…  {d.listen}  pid {d.pid}")
        print(f"training the tiny GPT with {method} (H={sync_every}) for {steps} steps "
              f"on each of {peers} peers")
        ctx = mp.get_context("spawn")
        progress = ctx.Queue()
        procs = [ctx.Process(target=_trainer, args=(str(d.socket), i, cfg, progress))
                 for i, d in enumerate(daemons)]
        for p in procs:
            p.start()
        done: dict[int, Any] = {}
        steps_done = [0] * peers
        tty = sys.stdout.isatty()
        while len(done) < peers:
            try:
                kind, index, value = progress.get(timeout=600)
            except queue.Empty:
                print("\ntraining stalled for 10 minutes; giving up")
                return 1
            if kind == "step":
                steps_done[index] = value + 1
                total = sum(steps_done)
                if tty:
                    sys.stdout.write("\r  " + _bar(total, steps * peers))
                    sys.stdout.flush()
                elif total % max(1, steps * peers // 10) == 0:
                    print("  " + _bar(total, steps * peers), flush=True)
            elif kind == "error":
                print(f"\npeer {index} failed: {value}")
                return 1
            else:
                done[index] = value
        for p in procs:
            p.join(timeout=30)
        print()
        return _summary([done[i] for i in range(peers)], time.monotonic() - t0)
    except PeerdError as exc:
        print(f"demo failed: {exc}")
        return 1
    finally:
        stop_all(daemons)
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(results: list[Any], seconds: float) -> int:
    print(f"{'peer':<14} {'loss start':>10} {'loss end':>9} {'held-out':>9} "
          f"{'MB sent':>8} {'rounds':>6}")
    for r in results:
        print(f"{r.member[:12] + '…':<14} {r.train_loss_start:>10.3f} {r.train_loss_end:>9.3f} "
              f"{r.held_out_loss:>9.3f} {r.bytes_sent / 1e6:>8.2f} {r.rounds:>6}")
    identical = len({r.fingerprint for r in results}) == 1
    print(f"{len(results)} peers, {results[0].rounds} outer rounds, "
          f"{sum(r.bytes_sent for r in results) / 1e6:.1f} MB sent in total, "
          f"{seconds:.0f} s; final parameters bit-identical on every peer: "
          f"{'yes' if identical else 'NO'}")
    return 0 if identical else 1
