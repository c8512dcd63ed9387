"""Shared-state sync: a joiner's download time from 1, 2 and 3 holders.

Each holder is its own process (a real node: QUIC control, encrypted TCP
data) holding N fp32 parameters; a fresh node joins the run and syncs with
RECEIVE_ONLY, downloading the whole state striped over the holders and
verifying every piece. Printed per holder count: the joiner's download time
(the transfer phase: fetch, verify, install in place) and its whole sync
time after admission (also hashing its own state and agreeing on the popular
one), with goodputs. The LAST line is the speed-up of 3 holders over 1.

    python benchmarks/state_sync.py                         # loopback, 25M params
    sudo python benchmarks/state_sync.py --netns --rate 200mbit
        # every peer in its own network namespace, each uplink shaped by tc tbf
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUN = "bench-state"


# ---------------------------------------------------------------- the child


def make_state(size: int, seed: int, zero: bool) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    if zero:
        return {"params": np.zeros(size, np.float32), "step": np.zeros(1, np.int64)}
    return {"params": rng.standard_normal(size, dtype=np.float32),
            "step": np.array([seed], np.int64)}


async def child(key_hex: str, listen: str) -> None:
    import trio

    from collectives.api import SyncStrategy
    from collectives.driver import EngineConfig
    from collectives.membership import Timing
    from peerd.identity import SwarmKey
    from peerd.jsonlines import commands, emit
    from peerd.node import open_node

    # Several peers share this machine's few cores: tolerate stalls of seconds.
    PATIENT = EngineConfig(timing=Timing(heartbeat_timeout=30.0))  # noqa: N806
    async with open_node(SwarmKey(bytes.fromhex(key_hex)), listen=listen) as node:
        emit(event="ready", peer=node.peer_id.text, addr=node.listen_addresses[0])
        state: dict[str, Any] = {}
        async for cmd in commands():
            kind = cmd["cmd"]
            if kind == "connect":
                await node.connect(cmd["addr"])
                emit(event="connected")
            elif kind == "join":
                await node.join_run(RUN, cmd["members"], PATIENT)
                emit(event="joined")
            elif kind == "state":
                # on a thread: heartbeats go on while numpy draws the numbers
                state = await trio.to_thread.run_sync(
                    make_state, cmd["size"], cmd["seed"], cmd["zero"])
                emit(event="state")
            elif kind == "pending":
                now = trio.current_time()
                emit(event="pending",
                     value=cmd["peer"] in node.engine(RUN).core.joiners(now))
            elif kind == "sync":
                if cmd.get("join"):
                    await node.join_run(RUN, config=PATIENT)
                t0 = time.perf_counter()
                res = await node.sync_state(RUN, state, cmd["revision"],
                                            SyncStrategy[cmd["strategy"]])
                seconds = time.perf_counter() - t0
                from collectives.statesync import StateSync

                phases = StateSync.of(node.engine(RUN)).statistics().last_phases
                emit(event="synced", seconds=seconds, received=res.bytes_received,
                     phases=dict(phases),
                     sent=res.bytes_sent, members=len(res.participants),
                     sha=hashlib.sha256(state["params"].data).hexdigest())


# ---------------------------------------------------------------- the driver


class Peer:
    """One child process, driven over stdin/stdout (JSON lines)."""

    def __init__(self, key_hex: str, listen: str, prefix: list[str]) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(Path(__file__).resolve()), "--child", key_hex, listen],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.expect("ready", timeout=60)
        self.peer, self.addr = ready["peer"], ready["addr"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 600) -> dict[str, Any]:
        msg = self._lines.get(timeout=timeout)
        if msg is None or msg.get("event") != event:
            raise RuntimeError(f"expected {event}, got {msg} (exit {self.proc.poll()})")
        return msg

    def request(self, event: str, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.expect(event)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send(cmd="quit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait(timeout=10)


Factory = Callable[[str, str], Peer]


def one_trial(factory: Factory, holders: int, size: int) -> dict[str, Any]:
    """``holders`` holder processes and one joiner; returns the joiner's figures."""
    key_hex = os.urandom(32).hex()
    peers: list[Peer] = []
    try:
        for i in range(holders + 1):
            peers.append(factory(key_hex, f"h{i}" if i < holders else "joiner"))
        hs, joiner = peers[:holders], peers[holders]
        for i, p in enumerate(peers):
            for q in peers[:i]:
                p.request("connected", cmd="connect", addr=q.addr)
        members = [p.peer for p in hs]
        for p in hs:
            p.send(cmd="join", members=members)
        for p in hs:
            p.expect("joined")
        for p in hs:
            p.send(cmd="state", size=size, seed=1, zero=False)
        joiner.send(cmd="state", size=size, seed=0, zero=True)
        for p in peers:
            p.expect("state")
        for p in hs:  # a first boundary among the holders: links up, state agreed
            p.send(cmd="sync", revision=1, strategy="ENFORCE_POPULAR")
        for p in hs:
            p.expect("synced")
        joiner.send(cmd="sync", join=True, revision=0, strategy="RECEIVE_ONLY")
        deadline = time.monotonic() + 60
        while not hs[0].request("pending", cmd="pending", peer=joiner.peer)["value"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the joiner's request never reached the holders")
            time.sleep(0.05)
        for p in hs:
            p.send(cmd="sync", revision=2, strategy="ENFORCE_POPULAR")
        got = joiner.expect("synced")
        ref = [p.expect("synced") for p in hs]
        if any(r["sha"] != got["sha"] for r in ref) or got["members"] != holders + 1:
            raise RuntimeError("the joiner's state differs from the holders'")
        return got
    finally:
        for p in peers:
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=25_000_000, help="fp32 parameters")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print the joiner's phase times")
    ap.add_argument("--netns", action="store_true", help="shaped links in namespaces (root)")
    ap.add_argument("--rate", default="200mbit", help="tbf rate of every uplink with --netns")
    args = ap.parse_args()

    lab: Any = None
    if args.netns:
        sys.path.insert(0, str(ROOT / "tests" / "lab"))
        from netns import Lab

        lab = Lab()

    def factory(key_hex: str, name: str) -> Peer:
        if lab is None:
            return Peer(key_hex, "127.0.0.1:0", [])
        host = lab.public_host(name)
        lab.limit_rate(host, args.rate)
        return Peer(key_hex, f"{host.ip}:0", ["ip", "netns", "exec", host.ns])

    nbytes = args.size * 4
    where = f"netns, every uplink {args.rate}" if args.netns else "loopback"
    print(f"joiner downloads {args.size:,} fp32 ({nbytes / 1e6:.0f} MB) over {where}")
    print("download = the transfer phase (fetch, verify, install); sync = the whole")
    print("sync_state call after admission (hash own state, announce, agree, download)")
    print(f"{'holders':>8} {'download s':>11} {'MB/s':>7} {'sync s':>8} {'MB/s':>7}   reps")
    best: dict[int, tuple[float, float]] = {}
    try:
        for holders in (1, 2, 3):
            trials = []
            for _ in range(args.reps):
                if lab is not None:  # fresh namespaces per trial: names are per host
                    lab.close()
                    lab = type(lab)()
                got = one_trial(factory, holders, args.size)
                trials.append((got["phases"]["transfer"], got["seconds"]))
                if args.verbose:
                    print(f"   joiner phases: {got['phases']}")
            best[holders] = (min(t[0] for t in trials), min(t[1] for t in trials))
            dl, total = best[holders]
            shown = " ".join(f"{d:.2f}/{t:.2f}" for d, t in trials)
            print(f"{holders:>8} {dl:>11.2f} {nbytes / dl / 1e6:>7.1f} {total:>8.2f} "
                  f"{nbytes / total / 1e6:>7.1f}   {shown}")
    finally:
        if lab is not None:
            lab.close()
    print(f"speed-up of 3 holders over 1 ({where}): download {best[1][0] / best[3][0]:.2f}x, "
          f"whole sync {best[1][1] / best[3][1]:.2f}x")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        import trio

        trio.run(child, sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
