"""All-reduce: peerd against torch.distributed gloo, same machine, same data.

Runs P peer processes that all-reduce N fp32 elements with peerd (encrypted,
fault-tolerant, striped TCP) and then the same with gloo, and prints per size:
time per all-reduce, bus bandwidth (2(P-1)/P * bytes / time), each peer's
peak extra resident memory, and the CPU seconds and minor page faults of the
peer that spent most (first-touch faults cost ~15 us per 4 KiB page on the
2-core VMs, 0.26 GB/s: peerd's scratch pool keeps its buffers mapped, so a
timed 100M round takes 8-14 faults; gloo's ~500).

peerd runs twice: in place (``all_reduce(x)``, as gloo does: the ring works
in a scratch buffer and copies the result into ``x`` once every peer agreed,
so a failed round leaves ``x`` whole), and into a buffer of the caller's
(``all_reduce(x, out=y)``: the ring works in ``y``, ``x`` is only read, no
copy; ``y`` is kept from round to round, as a training loop keeps its
buffers, and counted in the memory column). The last two lines are the
ratios peerd-time / gloo-time of both for the largest size, ``out=`` last.

    python benchmarks/allreduce.py                     # 4 peers, 10M and 100M
    python benchmarks/allreduce.py --quant int8        # peerd with int8 on the wire
    python benchmarks/allreduce.py --repeat 3          # 3 blocks of all three in turn;
        # the last lines are the medians of the blocks' ratios
    sudo python benchmarks/allreduce.py --netns --rate 200mbit --elements 10000000
        # peers in network namespaces, each uplink shaped by tc tbf; prints
        # achieved bus bandwidth / link limit

Where each peer may use 4 cores or more, the ring reduces large blocks and
copies the result on worker threads, while the data channels move messages
on the event loop (the native record loops do a whole message in one call);
on fewer cores everything runs on the event loop. Set
``PEERD_PEERPROC_DATA_THREADS=0`` to keep everything on the event loop, ``=1``
to move large messages on worker threads too (``NodeConfig.data_threads``;
the default before session 19), and ``PEERD_PEERPROC_SUB_CHUNK_BYTES`` to
sweep the ring's pipelining unit.
Measured (session 8), ratio peerd / gloo:

    machine                       100M                          10M
    16 cores (H100 host), 5 runs  1.20 1.43 1.33 1.40 1.33      1.6-2.1
      same host, event-loop I/O   2.92 (0.72 s vs gloo 0.25)
    2 cores, 4 peers share them   1.93-2.19 (CPU-bound: sum of  ~2.2
                                  all peers' CPU, cipher incl.)
    netns, 200 Mbit/s tbf (10M):  bus bandwidth / limit 0.87-0.94, median 0.91 (20 runs)

On the 16-core host, smaller sub-chunks cost time (10M: 2.5 MB auto 0.043 s,
1 MiB 0.074, 512 KiB 0.133, 256 KiB 0.243): each block crosses threads a
few times, and those wakeups, not bytes, bound small blocks there.

Where the 2-core gap comes from (session 9, 100M, per peer, median of 3;
the user and kernel columns): kernel time is the same for both systems
(peerd 0.34-0.39 s, gloo 0.28-0.38 s: the loopback TCP copies), while
peerd spends 0.42-0.47 s in user space against gloo's 0.04-0.08 s. Of
that, the cipher is 0.12-0.16 s (sealing and opening 600 MB each way;
0.117 s in isolation), the all-or-nothing copy into the caller's array
0.035-0.055 s, the sums 0.02-0.03 s, and the rest (~0.2 s) is the event
loop's Python across ~1200 records and ~600 stripes. With 4 peers on 2
cores the time is total CPU / 2, so even with no Python at all the ratio
would sit near (0.17 + 0.36) / (0.05 + 0.36), about 1.3-1.5. Ratios that
day: 1.58, 1.80, 1.75, 1.51, 1.94 (median 1.75); 10M 1.7-1.8.

Session 10, same machine, 8 runs, 100M: 1.54 1.55 1.46 1.34 1.62 1.15
1.36 1.64 (median 1.50; 10M 1.37 1.45 1.73 1.68 1.42 1.65). These spread
with gloo, whose time ran from 0.95 to 1.40 s, while peerd's stayed at
1.56-1.78 s; in the two quietest runs (gloo 1.01-1.02 s) the ratio was
1.54-1.55. The code of session 9's end, in the same hour: 1.56, 1.59
(peerd 1.68-1.70 s): a few percent at most, within the noise. Profiled
on the exact all-reduce window (the peer's result carries monotonic start
and end for ``perf record -k CLOCK_MONOTONIC``): kernel 35-44%, Python
22-28%, AEGIS 18-29%, memmove 6-7%, numpy sums 3-4% of all CPU; py-spy
inside one peer's all-reduce: os.write 37%, os.readv 20%, cipher 27%, the
rest spread over frames of under 1% each. No hotspot is left to take out.

Session 13: peers start each timed round at one instant (``start_in``), as
gloo's workers do after their barrier; before, the driver's commands reached
them 4-12 ms apart on 2 cores, and the first to start counted the wait. The
phase line splits the slowest peer's time into ring, status round and copy.
16-core hosts, 4 peers (ratio peerd / gloo; code before the thread hop below):

    host                          10M                       100M
    H200, 3 runs                  3.5 1.81 1.70             1.88
    H100 (Firecracker), 5 runs    3.2 1.8 2.02 2.04 1.86     2.27 1.13 1.37
      (10 MB sub-chunks: 1.91)

There 10M took peerd 49-53 ms (ring 40-46, status 1.6-2.2, copy 3.9-4.4)
against gloo's 24-29 ms, once the machine had warmed up; the first run of a
machine is slow. No knob moved it (``allreduce_knobs.py``), and the peers'
user CPU (0.076-0.086 s per round against 0.03-0.05 on 2 cores without
threads) pointed
at the worker-thread path: ``trio.to_thread`` costs per hand-off (limiter,
context copy, two thread renames) and a GIL hand-off per record. The data
path now hops with ``peerd.datasock.hop``: on 2 cores with threads forced on,
10M CPU per peer 0.109-0.119 s -> 0.095-0.097 (time 0.22-0.25 -> 0.20); a
bulk link in one process moves 30% more per CPU second. Not yet measured on
16 cores; nor are 4 MiB records (``NodeConfig.data_record``), which cut
threaded user CPU by another 20-27% on 2 cores. 2 cores, default (no threads),
3 runs that day: 100M 1.31, 2.12 (gloo 0.70 s, its fastest), 1.45; 10M 1.63,
2.05; peerd's own time 1.37-1.63 s, the same before and after that session's
changes when run alternately (1.82, 1.57 against 1.63, 1.62).

Session 14: the record loops run in C (``peerd/_datapump.c``; one call per
message, GIL released). Compared on one swarm, round by round
(``allreduce_knobs.py`` with ``native`` 1 and 0), 2 cores, median of the
slowest peer: 100M 1397 ms against 1471 with the Python loops (-5%; gloo
705 ms), 10M 163 against 176 (-7%; gloo 87); with worker threads forced on,
10M 193 against 191 (no change on 2 cores). A bulk link in one process:
user CPU 0.44 -> 0.37 s/GiB. Separate benchmark runs that hour (the machine
slower, gloo 0.96-1.09 s at 100M): native 1.57, 1.61, 1.72; Python 1.56,
1.86, 1.66. On 2 cores the time is the peers' total CPU over 2, and peerd's
is now mostly the cipher (~0.12 s per peer at 100M), the kernel's TCP copies
(as gloo's) and the all-or-nothing copy into the caller's array; not yet
measured on 16 cores, where each message now takes one GIL hand-off each
way (counted: 1.04-1.10 native calls per received message with threads).
Automatic sub-chunks are now half a ring chunk (at most 8 MiB) instead of a
quarter (at most 4 MiB): at 10M on 2 cores, 5 MB blocks took 11-14% less
time than 2.5 MB ones (median of 10, 16 and 24 interleaved rounds); 100M
with 8 MiB blocks the same as with 4. The first benchmark run after it:
10M 1.20 (gloo slow that run, 0.128 s), 100M 1.54; peak extra memory 1.05x
and 1.00x the tensor.

Session 15: records use AEGIS-128X2 (libaegis through ``pyaegis``) where
both peers have it: 21.7/20.1 GB/s sealing/opening per core on the 2-core
VMs' EPYC (vector AES), against AEGIS-128L's 12.4/12.1. Before it, a perf
profile of one peer's 100M rounds put 22% of its CPU in the cipher, 47% in
the kernel, 20% in the interpreter. Alternating runs (``PEERD_CIPHERS``
pins one), 2 cores, 100M: AEGIS-128L 1.608 and 1.626 s (ratio 1.66, 1.63),
AEGIS-128X2 1.366 and 1.460 s (1.34, 1.21); 10M with 12 rounds per run,
three pairs: 128L 0.175, 0.144, 0.160 s (1.49, 1.70, 1.71), 128X2 0.152,
0.170, 0.165 s (1.50, 1.36, 1.38): at 10M the cipher's share is too small
to show through the noise. The slowest peer's phases at 100M: ring
1.16-1.35 s, status round 4-9 ms (one run 89), the all-or-nothing copy
into the caller's array 104-131 ms (four peers copying 400 MB each at once
on two cores). A 1000-element round (the fixed cost: view check, history
exchange, status round, over QUIC) takes peerd 17 ms and 8 ms of CPU per
peer, gloo 11 and 5.

Session 17: TCP congestion control. The 2-core VMs' host default is BBR
(v1). Through the netns lab's 200 Mbit/s tbf uplinks, one link of the ring
would lose 50-350 ms of a 2.5 s round now and then (no drops, no
retransmits: BBR left the shaped link idle), whichever peer it was, with
1, 2 or 4 connections a hop; with CUBIC every link ran at the shaped rate
(rings of all 4 peers within 2.49-2.54 s, the bare minimum with TCP/IP
headers being 2.51). peerd's data sockets now ask for CUBIC
(``NodeConfig.data_congestion``; ``--congestion`` here). Netns, 10M, median
of 5 rounds, three alternating pairs: CUBIC 0.95 0.95 0.95 of the link
limit (2.527-2.532 s), BBR 0.92 0.92 0.92 (2.605-2.620 s). On loopback
BBR's pacing cost CPU too: peerd 10M 0.106-0.108 s against 0.131-0.134,
100M 1.056-1.065 against 1.18-1.32 (alternating, no gloo). gloo gains from
CUBIC as well (100M 0.54-0.77 s against 0.67-0.74 with BBR; 10M within its
noise), so gloo's sockets are now given the same one (``_ccshim``: an
LD_PRELOAD library; the line "TCP congestion control" says what each ran).
On equal terms, four runs: 10M peerd 0.101-0.112 s, gloo 0.049-0.082;
100M peerd 0.864-0.892 s, gloo 0.467-0.859 (ratios 1.03-1.88: gloo's
spread again).

Socket buffers: the data sockets asked for 8 MiB each way, which switches
the kernel's autotuning off and is capped at ``net.core.rmem_max`` (4 MiB
on these VMs, 208 KiB on an untuned host: a window that holds a 100 ms
path to ~30 Mbit/s per connection). Now a fixed size is asked only where
it beats autotuning (``peerd.datasock.fixed_buffer``): here the sending
side, while receiving sockets grow to ``tcp_rmem``'s 32 MiB. Alternating
runs on loopback, fixed both ways against the new plan: 10M 0.111-0.119 s
against 0.100-0.104, 100M 0.881-1.003 against 0.829-0.839; across
namespaces both 0.95 of the limit.

Session 18 (a 2-core VM with AVX-512 and VAES; not comparable with the
EPYC VMs' figures above). A perf profile of the timed 10M rounds: kernel 39%
(TCP copies 14%), interpreter 29%, AEGIS-128X2 15%, memmove 7% (the
all-or-nothing copy), numpy's adds 5%. Three changes:
- ``out=``: the ring works in the caller's destination, no copy. The copy
  phase was 4-7 ms of a 67-76 ms round at 10M and 74-77 ms of 0.56-0.60 s at
  100M; three runs with both rows: 10M 0.061-0.064 s into out= against
  0.067-0.071 in place, 100M 0.497-0.525 against 0.562-0.602.
- AEGIS-128X4 where the CPU has AVX-512 VAES: 47.6/55.1 GB/s sealing/opening
  against X2's 31.0/34.7 in a loop, 24% fewer cipher samples in the profile
  (the records come from memory, not cache); alternating runs pinned to X2
  (``PEERD_CIPHERS``), 100M into out=: 0.470 and 0.507 s against 0.526 and
  0.557; 10M within the noise.
- On the event loop alone a ring chunk goes whole, up to 16 MiB
  (``collectives.driver``): 10M into out=, six alternating pairs, 1-10% less
  time than two blocks a chunk.
Then, three runs: 10M in place 0.065-0.068 s, into out= 0.055-0.057, gloo
0.041-0.044 (ratios 1.50-1.66 and 1.30-1.34); 100M in place 0.502-0.517,
into out= 0.423-0.471, gloo 0.368-0.418 (1.24-1.37 and 1.11-1.26). Across
namespaces 0.95 of the limit, three runs.
- A block that arrives before its receive is posted (the left neighbour
  started sooner: in 11 of 20 rounds for one peer, the 10 MB first block)
  was held in a fresh ``bytearray``: 4-5 ms to zero and fault in, against
  0.3 ms for the copy. Now held buffers are kept for the next early payload
  of the same size (``peerd.datainbox.SPARE``).
The last four runs (the first two before the kept buffers were limited to
one per size): 10M in place 0.057-0.062 s (1.30, 1.48, 1.32, 1.16),
into out= 0.052-0.060 (1.15, 1.26, 1.36, 1.06), gloo 0.042-0.049; 100M in
place 0.472-0.513 (1.17, 1.37, 1.31, 1.21), into out= 0.428-0.482 (1.14,
1.29, 1.18, 1.09), gloo 0.374-0.411. Peak extra memory at 10M in place
1.30-1.32x the tensor in the last two (a kept 10 MB block; 1.30 and 1.55x
before the limit), into out= 1.00x; 100M 1.00-1.04x.

Session 19 (the same kind of VM): the ratios moved with the hour. At the
start, three runs: 10M in place 1.83-1.89, into out= 1.40-1.59; 100M
1.50-1.63 and 1.27-1.58. The last two: 10M 1.20 and 1.49, into out= 1.15
and 1.30; 100M 1.28 and 1.47, into out= 1.31 and 1.30. With a core per peer
(``--peers 2``), 100M into out= took 0.164-0.193 s with messages on the
event loop against 0.195-0.256 with them on worker threads, which is why
messages now stay on the loop by default (``peerd.datachan``); unmeasured
on the 16-core host.

Session 20 (the same kind of VM), ``--repeat 3``: per-block ratios 10M in
place 1.44, 1.26, 1.36 (median 1.36), into out= 1.28, 1.36, 1.30 (1.30);
100M 1.51, 1.52, 1.53 (1.52) and 1.28, 1.58, 1.36 (1.36); gloo 0.048-0.050
and 0.403-0.411 s. Each peer allocates its held buffer for early blocks
once (2,443 faults at 10M), so the first block's in-place row, which runs
first, pays it; later blocks print no memory figures. Both ends of one
4-channel link in one process (2 cores): 18-26 Gbit/s at 0.33-0.48 CPU-s/GiB
with messages on the event loop, 20-25 Gbit/s at 0.49-0.59 with them on
worker threads: a spare core bought no throughput.

Session 23 (the same kind of VM), ``--repeat 3`` medians over five runs at
10M: in place 1.48, 1.53, 1.37, 1.40, 1.30; into out= 1.40, 1.22, 1.23,
1.31, 1.16 (gloo 0.035-0.052 s). 100M once: 1.22 (blocks 1.22, 1.21, 1.44)
and 1.23 (1.23, 1.19, 1.27); gloo 0.376-0.384 s. From the third run on,
each peer's result checks (sha256 of the result, the input-intact check)
wait until every peer has returned: made right after a peer's own call,
they took CPU from the peers still timing theirs (interleaved A/B: 10M 0.970
and 0.990 of the time with them inline, 100M 1.006). ``--netns --rate
200mbit`` at 10M: bus bandwidth / limit 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Run as a script, this folder is sys.path[0], and benchmarks/crdt.py, nat.py
# would shadow the packages of the same name: move the folder to the end of
# the path, where it still serves the sibling helper _gloo (also to the gloo
# worker processes, which are spawned with this path and must import it).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(ROOT))
sys.path.append(str(_HERE))

from _ccshim import effective  # noqa: E402
from _gloo import run_gloo  # noqa: E402
from _netns import netns_factory  # noqa: E402

from collectives.api import Quant  # noqa: E402
from peerd.config import NodeConfig  # noqa: E402
from peerd.datasock import check_congestion, host_congestion  # noqa: E402
from peerd.peerproc import LocalSwarm  # noqa: E402

QUANTS = {"none": Quant.NONE, "fp16": Quant.FP16, "bf16": Quant.BF16, "int8": Quant.INT8}


def bus_gbit(peers: int, nbytes: int, seconds: float) -> float:
    return 2 * (peers - 1) / peers * nbytes * 8 / seconds / 1e9


WARMUP_ELEMENTS = 4096
# Peers start each timed all-reduce at one instant, this long after the driver
# sends the commands (gloo's workers start after a barrier).
START_IN = 0.05


def run_peerd(sw: LocalSwarm, elements: int, iters: int, quant: Quant,
              first_round: int, into: bool = False) -> dict[str, Any]:
    """A small all-reduce opens every link; the first full-size one is measured
    for memory (nothing of this size was allocated before, so the allocator
    cannot hide it) but not timed; then ``iters`` timed ones. ``into``: the
    result goes to a buffer of the caller's, kept across rounds (``out=``)."""
    per_iter: list[float] = []
    cpu: list[tuple[float, float, float, int]] = []
    phases: list[dict[str, float]] = []
    peaks: list[int] = []
    sent = 0
    for i in range(iters + 2):
        size = WARMUP_ELEMENTS if i == 0 else elements
        res = sw.all_reduce(sw.peers, size=size, seed=11, round=first_round + i,
                            quant=int(quant), timeout=900, start_in=START_IN, into=into)
        bad = [r for r in res if r["event"] != "result"]
        if bad:
            logs = "\n".join(f"--- peer {p.index} ({p.peer[:8]}):\n{p.stderr_tail(2000)}"
                             for p in sw.peers)
            raise RuntimeError(f"peerd all-reduce failed: {bad}\n{logs}")
        if len({r["sha256"] for r in res}) != 1:
            # Say enough to tell a broken guarantee (same participants and
            # revision, different bytes) from results over different views.
            seen = [(r["sha256"][:12], r["revision"], r["attempts"], len(r["participants"]),
                     r["participants"][:2]) for r in res]
            raise RuntimeError(f"peerd results differ between peers (sha256, revision, "
                               f"attempts, participants): {seen}")
        if i == 1:
            peaks = [r["peak_extra_bytes"] for r in res]
        if i < 2:
            continue
        slowest = max(res, key=lambda r: r["seconds"])
        per_iter.append(slowest["seconds"])
        phases.append(slowest["phases"])
        cpu.append(max((r["cpu_seconds"], r["cpu_user"], r["cpu_system"], r["page_faults"])
                       for r in res))
        sent = max(r["bytes_sent"] for r in res)
    return {"median_s": statistics.median(per_iter), "min_s": min(per_iter),
            "peak_extra_bytes": max(peaks), "peaks": peaks, "bytes_sent_per_peer": sent,
            "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
            **dict(zip(("cpu_s", "user_s", "sys_s", "faults"), sorted(cpu)[len(cpu) // 2],
                       strict=True))}


def run_block(sw: LocalSwarm, args: argparse.Namespace, quant: Quant, congestion: str,
              elements: int, first_round: int) -> dict[str, dict[str, Any]]:
    """One block: peerd in place, peerd into ``out=`` (not with ``--netns``), then gloo."""
    rows = {"peerd": run_peerd(sw, elements, args.iters, quant, first_round=first_round)}
    if not args.netns:
        into = run_peerd(sw, elements, args.iters, quant, first_round=first_round + 50,
                         into=True)
        # The out= buffer is the caller's, made before the timer: counted
        # here as extra memory all the same.
        into["peak_extra_bytes"] += elements * 4
        into["peaks"] = [p + elements * 4 for p in into["peaks"]]
        rows["peerd out="] = into
    if not args.no_gloo and not args.netns:
        rows["gloo"] = run_gloo(args.peers, elements, args.iters, congestion=congestion)
    return rows


def print_rows(args: argparse.Namespace, rows: dict[str, dict[str, Any]], elements: int,
               first: bool, congestion: str, memory: bool = True) -> None:
    """The rows of one block. ``memory``: only a size's first block measures
    peak memory; later ones reuse buffers the first one left pooled."""
    nbytes = elements * 4
    for name, r in rows.items():
        peak = (f"{r['peak_extra_bytes'] / 1e6:>14.1f} {r['peak_extra_bytes'] / nbytes:>9.2f}"
                if memory else f"{'-':>14} {'-':>9}")
        print(f"{elements:>12} {name:>10} {r['median_s']:>8.3f} "
              f"{bus_gbit(args.peers, nbytes, r['median_s']):>11.2f} {peak} "
              f"{r['cpu_s']:>11.3f} {r['user_s']:>7.3f} {r['sys_s']:>7.3f} {r['faults']:>7d}")
    if first:
        theirs = f", gloo {rows['gloo']['congestion']}" if "gloo" in rows else ""
        print(f"{'':>12} TCP congestion control: peerd {effective(congestion)}"
              f"{theirs} (host default {host_congestion()})")
    if memory:
        for name, r in rows.items():
            print(f"{'':>12} {name} peak extra MB of each peer: "
                  + ", ".join(f"{p / 1e6:.1f}" for p in r["peaks"]))
    for name in ("peerd", "peerd out="):
        if name in rows:
            split = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rows[name]["phases"].items())
            print(f"{'':>12} {name} phases of the slowest peer (median): {split}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--elements", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1,
                    help="blocks of (peerd, peerd out=, gloo) per size, run in turn; the "
                    "ratios printed last are the medians of the blocks' ratios (on a shared "
                    "machine the load drifts between blocks more than within one)")
    ap.add_argument("--quant", choices=sorted(QUANTS), default="none")
    ap.add_argument("--netns", action="store_true",
                    help="run peers in network namespaces with shaped links (root)")
    ap.add_argument("--rate", default="200mbit", help="tbf rate per peer uplink with --netns")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--congestion", help="TCP congestion control of peerd's data sockets "
                    "(NodeConfig.data_congestion: cubic, bbr, system, ...); default: peerd's")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Both sides on one congestion control (see ``_ccshim``): peerd's data
    # sockets ask for it themselves, gloo's get it through LD_PRELOAD.
    congestion = check_congestion(args.congestion or NodeConfig.data_congestion)
    os.environ["PEERD_PEERPROC_DATA_CONGESTION"] = congestion
    quant = QUANTS[args.quant]

    lab, factory = netns_factory(args.rate) if args.netns else (None, None)
    link_ratios: list[float] = []
    ratios: dict[str, float] = {}
    try:
        with LocalSwarm(args.peers, factory=factory) as sw:
            print(f"{args.peers} peers, quant={args.quant}, netns={args.netns}")
            print(f"{'elements':>12} {'system':>10} {'time s':>8} {'bus Gbit/s':>11} "
                  f"{'peak extra MB':>14} {'x tensor':>9} {'CPU s/peer':>11} {'user':>7} "
                  f"{'kernel':>7} {'faults':>7}")
            for n, elements in enumerate(args.elements):
                nbytes = elements * 4
                per_block: dict[str, list[float]] = {"peerd": [], "peerd out=": []}
                for block in range(args.repeat):
                    rows = run_block(sw, args, quant, congestion, elements,
                                     first_round=n * 1000 + block * 100)
                    print_rows(args, rows, elements, first=n == 0 and block == 0,
                               congestion=congestion, memory=block == 0)
                    if quant is not Quant.NONE or (n == 0 and block == 0):
                        fp32_wire = 2 * (args.peers - 1) / args.peers * nbytes
                        sent = rows["peerd"]["bytes_sent_per_peer"]
                        print(f"{'':>12} peerd wire bytes per peer: {sent:,} "
                              f"({sent / fp32_wire:.2f} of fp32)")
                    if args.netns:
                        limit = float(args.rate.removesuffix("mbit")) / 1000
                        link_ratios.append(
                            bus_gbit(args.peers, nbytes, rows["peerd"]["median_s"]) / limit)
                    elif "gloo" in rows:
                        for name in per_block:
                            per_block[name].append(
                                rows[name]["median_s"] / rows["gloo"]["median_s"])
                if per_block["peerd"]:
                    ratios = {name: statistics.median(v) for name, v in per_block.items()}
                    if args.repeat > 1:
                        for name, v in per_block.items():
                            print(f"{'':>12} {name} / gloo per block: "
                                  + ", ".join(f"{r:.2f}" for r in v)
                                  + f" (median {ratios[name]:.2f})")
    finally:
        if lab is not None:
            lab.close()
    if args.netns:
        # The last size's blocks, as for the gloo ratios.
        last = link_ratios[-args.repeat:]
        print(f"ratio achieved bus bandwidth / link limit: {statistics.median(last):.2f}")
    elif ratios:
        size = f"{args.elements[-1]:,} fp32"
        print(f"ratio peerd-time / gloo-time, in place with the all-or-nothing copy ({size}): "
              f"{ratios['peerd']:.2f}")
        print(f"ratio peerd-time / gloo-time, into out= ({size}): {ratios['peerd out=']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
