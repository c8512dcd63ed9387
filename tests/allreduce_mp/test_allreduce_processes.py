"""All-reduce across real peer processes on loopback: correctness, bit-identity,
kills at named phases, SIGSTOP, and a join between rounds."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from collectives.membership import HEARTBEAT_TIMEOUT
from peerd import aead
from peerd.peerproc import LocalSwarm, PeerProcess, make_input
from tests.allreduce_mp.checks import check_round

SIZES = [1, 2, 3, 7, 1009, 65_537, 1_000_003]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sizes_match_reference_and_are_bit_identical(n: int, tmp_path: Path) -> None:
    with LocalSwarm(n) as sw:
        for rnd, size in enumerate(SIZES):
            op = "sum" if rnd % 2 else "avg"
            res = sw.all_reduce(sw.peers, size=size, seed=n, round=rnd, op=op, out=str(tmp_path))
            check_round(sw, res, n, rnd, size, tmp_path, op)
            assert sorted(res[0]["participants"]) == sorted(p.peer for p in sw.peers)
        # Same inputs and view again: identical bytes across reruns.
        again = sw.all_reduce(sw.peers, size=SIZES[-1], seed=n, round=len(SIZES) - 1,
                              out=str(tmp_path))
        assert again[0]["sha256"] == res[0]["sha256"]


def test_into_a_buffer_of_its_own_gives_the_in_place_bytes(tmp_path: Path) -> None:
    with LocalSwarm(3) as sw:
        for rnd, size in enumerate([1, 7, 65_537, 1_000_003]):
            res = sw.all_reduce(sw.peers, size=size, seed=9, round=rnd, out=str(tmp_path),
                                into=True)
            check_round(sw, res, 9, rnd, size, tmp_path)
            assert all(r["input_intact"] is True for r in res)
            in_place = sw.all_reduce(sw.peers, size=size, seed=9, round=rnd)
            assert {r["sha256"] for r in in_place} == {res[0]["sha256"]}


def test_eight_peers_small_tensors(tmp_path: Path) -> None:
    with LocalSwarm(8) as sw:
        for rnd, size in enumerate([1, 5, 8, 9, 4099]):
            res = sw.all_reduce(sw.peers, size=size, seed=8, round=rnd, out=str(tmp_path))
            check_round(sw, res, 8, rnd, size, tmp_path)
            assert len(res[0]["participants"]) == 8


def test_peers_start_together_and_results_split_their_time(tmp_path: Path) -> None:
    with LocalSwarm(3) as sw:
        asked = time.monotonic()
        res = sw.all_reduce(sw.peers, size=65_537, seed=3, round=0, start_in=0.2,
                            out=str(tmp_path))
        check_round(sw, res, 3, 0, 65_537, tmp_path)
        for r in res:
            # No peer starts its timer before the common instant...
            assert r["monotonic_start"] >= asked + 0.2
            # ...and the phases of its (only) attempt account for its time.
            phases = r["phases"]
            assert set(phases) == {"ring", "status", "copy"}
            assert all(v >= 0 for v in phases.values())
            assert sum(phases.values()) <= r["seconds"] + 1e-3


@pytest.mark.parametrize("dtype,rtol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_dtypes(dtype: str, rtol: float, tmp_path: Path) -> None:
    with LocalSwarm(3) as sw:
        res = sw.all_reduce(sw.peers, size=10_007, seed=5, round=0, dtype=dtype,
                            out=str(tmp_path))
        assert all(r["event"] == "result" for r in res), res
        assert all(len(r["participants"]) == 3 for r in res)
        assert len({r["sha256"] for r in res}) == 1
        got = np.load(tmp_path / "r0_0.npy")
        if dtype == "bfloat16":
            import torch

            got = torch.from_numpy(got).view(torch.bfloat16).float().numpy()
        inputs = [make_input(5, i, 0, 10_007, dtype) for i in range(3)]
        if dtype == "bfloat16":
            import torch

            inputs = [torch.from_numpy(x).view(torch.bfloat16).float().numpy() for x in inputs]
        ref = np.mean([x.astype(np.float64) for x in inputs], axis=0)
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol, atol=rtol)


# 4 peers x 2M floats: each chunk is 2 sub-chunks of 1 MiB (set: on few cores
# a chunk this small would go whole), so a ring step sends several messages
# and "the 3rd send of a phase" is mid-phase.
FAULT_SIZE = 2_000_000
FAULT_BLOCKS = {"PEERD_PEERPROC_SUB_CHUNK_BYTES": str(1 << 20)}


# Peers whose data channels move large messages on I/O threads (the default
# on machines with cores to spare; this 2-core CI machine runs them inline).
IO_THREADS = {"PEERD_PEERPROC_DATA_THREADS": "1"}


@pytest.mark.parametrize(("die_at", "retry", "env", "into"), [
    ("before", False, None, False), ("before", True, None, False), ("r:3", False, None, False),
    ("r:3", True, None, False), ("g:2", False, None, False), ("g:2", True, None, False),
    ("r:3", True, IO_THREADS, False), ("g:2", False, IO_THREADS, False),
    # The ring running in the caller's out= buffer: a kill leaves that half
    # written, and the input must still be whole for the retry.
    ("g:2", True, None, True), ("r:3", False, None, True),
], ids=lambda v: "io-threads" if v == IO_THREADS else ("out" if v is True else None))
def test_sigkill_at_named_phase(
    die_at: str, retry: bool, env: dict[str, str] | None, into: bool, tmp_path: Path
) -> None:
    with LocalSwarm(4, env={**(env or {}), **FAULT_BLOCKS}) as sw:
        victim = sw.peers[2]
        survivors = [p for p in sw.peers if p is not victim]
        # A clean round first, so links are warm and the kill lands mid-run.
        check_round(sw, sw.all_reduce(sw.peers, size=1000, seed=1, round=0, out=str(tmp_path)),
                    1, 0, 1000, tmp_path)
        victim.send(cmd="allreduce", run=sw.run, size=FAULT_SIZE, seed=2, round=1,
                    die_at=die_at, retry=retry, out=str(tmp_path), into=into)
        res = sw.all_reduce(survivors, size=FAULT_SIZE, seed=2, round=1, retry=retry,
                            out=str(tmp_path), timeout=60, into=into)
        victim.proc.wait(timeout=10)
        assert victim.proc.returncode == -signal.SIGKILL
        if not retry:
            assert all(r["event"] == "error" and r["kind"] == "PeerLost" for r in res), res
            assert all(victim.peer in r["peers"] for r in res)
            assert all(r["input_intact"] for r in res)
        else:
            check_round(sw, res, 2, 1, FAULT_SIZE, tmp_path)
            assert sorted(res[0]["participants"]) == sorted(p.peer for p in survivors)
            assert all(r["input_intact"] is (True if into else None) for r in res), res
        # Whatever happened, the survivors go on together on the new view.
        res = sw.all_reduce(survivors, size=777, seed=3, round=2, out=str(tmp_path))
        check_round(sw, res, 3, 2, 777, tmp_path)
        assert victim.peer not in res[0]["participants"]


@pytest.mark.parametrize("env", [None, IO_THREADS], ids=["inline", "io-threads"])
def test_sigstop_detected_within_heartbeat_timeout(
    env: dict[str, str] | None, tmp_path: Path
) -> None:
    with LocalSwarm(3, env=env) as sw:
        check_round(sw, sw.all_reduce(sw.peers, size=100, seed=1, round=0, out=str(tmp_path)),
                    1, 0, 100, tmp_path)
        stopped = sw.peers[1]
        stopped.signal(signal.SIGSTOP)
        try:
            survivors = [sw.peers[0], sw.peers[2]]
            t0 = time.monotonic()
            # Large enough that the stopped peer's sockets fill up under the sends.
            res = sw.all_reduce(survivors, size=FAULT_SIZE, seed=4, round=1,
                                out=str(tmp_path))
            elapsed = time.monotonic() - t0
            check_round(sw, res, 4, 1, FAULT_SIZE, tmp_path)
            assert stopped.peer not in res[0]["participants"]
            # Detection by heartbeat silence, plus one view change and the rerun.
            assert elapsed < HEARTBEAT_TIMEOUT + 5, elapsed
        finally:
            stopped.signal(signal.SIGCONT)


def test_joiner_takes_part_from_next_round(tmp_path: Path) -> None:
    with LocalSwarm(3) as sw:
        check_round(sw, sw.all_reduce(sw.peers, size=500, seed=1, round=0, out=str(tmp_path)),
                    1, 0, 500, tmp_path)
        joiner = sw.add_peer()
        joiner.send(cmd="join", run=sw.run, timeout=60)
        # Members hold a round boundary each "training round"; the first one
        # after the join request arrives admits the joiner (bounded rounds).
        for _ in range(20):
            for p in sw.peers[:3]:
                p.send(cmd="update_view", run=sw.run)
            views = [p.expect("view", timeout=60) for p in sw.peers[:3]]
            assert len({v["revision"] for v in views}) == 1
            if joiner.peer in views[0]["view"]:
                break
        joined = joiner.expect("joined", timeout=60)
        assert all(joiner.peer in v["view"] for v in views)
        assert joined["revision"] == views[0]["revision"]
        res = sw.all_reduce(sw.peers, size=501, seed=2, round=1, out=str(tmp_path))
        check_round(sw, res, 2, 1, 501, tmp_path)
        assert len(res[0]["participants"]) == 4


def test_a_peer_without_the_fast_cipher_still_takes_part(tmp_path: Path) -> None:
    """A volunteer whose install lacks pyaegis offers AEGIS-128L only: its
    sessions use that, the others' keep the CPU's fastest AEGIS-128X, and the
    ring mixes both."""
    def factory(key_hex: str, index: int) -> PeerProcess:
        return PeerProcess(key_hex, index, env={"PEERD_CIPHERS": "aegis128l"} if index == 0
                           else None)

    with LocalSwarm(3, factory=factory) as sw:
        res = sw.all_reduce(sw.peers, size=65_537, seed=4, round=0, out=str(tmp_path))
        check_round(sw, res, 4, 0, 65_537, tmp_path)
        short = {p.peer[:12]: i for i, p in enumerate(sw.peers)}
        for i, p in enumerate(sw.peers):
            ciphers = {short[s]: c for s, c in p.request(cmd="node_stats")["peer_ciphers"]}
            assert ciphers == {j: "aegis128l" if 0 in (i, j) else aead.built()[0]
                               for j in range(3) if j != i}
