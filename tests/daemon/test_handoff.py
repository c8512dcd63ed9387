"""The staged hand-off through a real daemon: multi-threaded copies stay bit-exact
for every layout, results never alias memory the daemon may still write, and
shared segments are unmapped on both sides when a client closes or is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from peerd.daemon.launcher import DaemonProcess
from peerd.errors import ProtocolError

SEGMENT_NAMES = ("peerd-staging", "peerd-shared")


# Unusual sizes, so that segments other tests left mapped in this process or in
# the shared daemon do not count: 3M floats stage in 12_001_280 bytes, 7777 in 32_768.
STAGED, SHARED = 3_000_000, 7777
SIZES = {12_001_280, 32_768}


def mapped_segments(pid: int | str) -> int:
    """How many shared segments of the sizes above process ``pid`` has mapped."""
    count = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span = line.split(maxsplit=1)[0]
        start, end = (int(x, 16) for x in span.split("-"))
        if end - start in SIZES and any(f"/memfd:{n}" in line for n in SEGMENT_NAMES):
            count += 1
    return count


def _bits(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32).view(np.float32)


def test_threaded_hand_off_is_bit_exact_for_strided_and_torch_arrays(
        swarm: list[DaemonProcess]) -> None:
    with swarm[2].client(copy_threads=3) as client:
        assert client._copier.threads == 3
        original = _bits(4_000_000 * 2, 11).reshape(2000, 4000)
        backing = original.copy()
        view = backing[:, ::2]  # 16 MB, not contiguous: staged slab by slab
        client.echo(view, mode=2)
        assert np.array_equal(backing[:, ::2].view(np.uint32),
                              original[:, ::2].view(np.uint32) ^ 0x80808080)
        assert np.array_equal(backing[:, 1::2].view(np.uint32), original[:, 1::2].view(np.uint32))
        tensor = torch.from_numpy(original.copy()).t()  # transposed torch view
        client.echo(tensor, mode=2)
        assert np.array_equal(tensor.numpy().view(np.uint32),
                              original.T.view(np.uint32) ^ 0x80808080)


def test_segments_are_unmapped_on_both_sides_when_the_client_closes(
        swarm: list[DaemonProcess], wait_until: Callable[..., None]) -> None:
    daemon = swarm[2]
    before, mine = mapped_segments(daemon.pid), mapped_segments("self")
    client = daemon.client()
    client.echo(np.ones(STAGED, np.float32), mode=2)  # a pooled staging segment
    shared = client.empty(SHARED)
    assert mapped_segments(daemon.pid) == before + 2
    assert mapped_segments("self") == mine + 2
    client.close()
    wait_until(lambda: mapped_segments(daemon.pid) == before, timeout=10.0)
    # the staging segment is gone here too; the shared array keeps its own mapping
    assert mapped_segments("self") == mine + 1
    shared[:] = 1.0
    del shared
    assert mapped_segments("self") == mine


CHILD = textwrap.dedent("""
    import sys, numpy as np, peerd
    client = peerd.connect(sys.argv[1])
    client.echo(np.ones(int(sys.argv[2]), np.float32), mode=2)
    keep = client.empty(int(sys.argv[3]))
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_segments_are_unmapped_when_the_client_is_killed(
        swarm: list[DaemonProcess], wait_until: Callable[..., None]) -> None:
    daemon = swarm[2]
    before = mapped_segments(daemon.pid)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(daemon.socket), str(STAGED),
                              str(SHARED)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert mapped_segments(daemon.pid) == before + 2
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        wait_until(lambda: mapped_segments(daemon.pid) == before, timeout=10.0)
        with daemon.client() as client:  # the daemon itself is unharmed
            assert client.status().pid == daemon.pid
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_a_refused_request_returns_its_staging_segment_for_reuse(
        swarm: list[DaemonProcess]) -> None:
    daemon = swarm[2]
    before = mapped_segments(daemon.pid)
    with daemon.client(copy_threads=2) as client:
        original = _bits(STAGED, 12)
        work = original.copy()
        client.echo(work, mode=2)
        with pytest.raises(ProtocolError, match="echo mode"):
            client.echo(work, mode=99)
        assert np.array_equal(work.view(np.uint32), original.view(np.uint32) ^ 0x80808080)
        client.echo(work, mode=2)  # reuses the one pooled segment
        assert np.array_equal(work.view(np.uint32), original.view(np.uint32))
        assert mapped_segments(daemon.pid) == before + 1
        assert len(client._pool._idle) == 1
