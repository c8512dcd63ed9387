"""Shared-memory hand-off: sealed memfds, untrusted tensor refs, and a 10M-element
round trip through a real daemon that must be bit-exact."""

from __future__ import annotations

import os
import socket

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.daemon.launcher import DaemonProcess
from peerd.daemon.protocol import TensorRef
from peerd.daemon.shm import Segment, fds_ancillary, fds_from_ancillary, nbytes_of
from peerd.errors import ProtocolError


def test_segment_is_sealed_and_shared_between_mappings() -> None:
    seg = Segment.create(10_000)
    assert seg.size % 4096 == 0 and seg.size >= 10_000
    fd = os.dup(seg._fd)  # type: ignore[arg-type]
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 4096)  # the seal forbids shrinking
    other = Segment.attach(fd, seg.size)
    ref = TensorRef(0, 16, "<f4", (10, 20))
    seg.array(ref)[...] = 7.5
    assert np.all(other.array(ref) == 7.5)
    seg.close()
    other.close()


def test_unsealed_or_wrong_size_descriptor_is_refused() -> None:
    fd = os.memfd_create("plain")
    os.ftruncate(fd, 4096)
    with pytest.raises(ProtocolError, match="not sealed"):
        Segment.attach(fd, 4096)
    seg = Segment.create(4096)
    with pytest.raises(ProtocolError, match="size"):
        Segment.attach(os.dup(seg._fd), 8192)  # type: ignore[arg-type]
    seg.close()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ProtocolError, match="not a memory file"):
        Segment.attach(r, 4096)


def test_descriptors_cross_a_unix_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seg = Segment.create(4096)
    a.sendmsg([b"x"], fds_ancillary([seg.take_fd()]))
    data, anc, _, _ = b.recvmsg(16, socket.CMSG_SPACE(16))
    (fd,) = fds_from_ancillary(anc)
    got = Segment.attach(fd, 4096)
    seg.mapping[:5] = b"hello"
    assert data == b"x" and got.mapping[:5] == b"hello"
    a.close()
    b.close()


@settings(max_examples=150, deadline=None)
@given(offset=st.integers(-10, 5000), dims=st.lists(st.integers(-2, 70), max_size=4),
       dtype=st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|O", "<U3", "V8", "bogus"]))
def test_tensor_refs_never_escape_their_segment(offset: int, dims: list[int], dtype: str) -> None:
    seg = Segment.create(4096)
    ref = TensorRef(1, offset, dtype, tuple(dims))
    try:
        arr = seg.array(ref)
    except ProtocolError:
        return
    finally:
        seg.close()
    assert arr.dtype.kind in "fiub"
    assert offset >= 0 and offset + nbytes_of(ref) <= seg.size
    assert arr.shape == tuple(dims)


def _random_bits(n: int) -> np.ndarray:
    # every bit pattern, NaN payloads and denormals included
    return np.random.default_rng(7).integers(0, 2**32, size=n, dtype=np.uint32).view(np.float32)


def test_ten_million_elements_round_trip_bit_exact(swarm: list[DaemonProcess]) -> None:
    original = _random_bits(10_000_000)
    with swarm[0].client() as client:
        work = original.copy()
        # the daemon sees exactly our bytes ...
        assert client.echo(work, mode=1) == blake3.blake3(original.view(np.uint8)).digest()
        # ... and what it writes comes back into our array, in place
        client.echo(work, mode=2)
        assert np.array_equal(work.view(np.uint8), original.view(np.uint8) ^ 0x80)
        client.echo(work, mode=2)
        assert np.array_equal(work.view(np.uint32), original.view(np.uint32))
        tensor = torch.from_numpy(original[:1000].copy()).reshape(10, 100)
        client.echo(tensor, mode=2)
        assert np.array_equal(tensor.numpy().reshape(-1).view(np.uint8),
                              original[:1000].view(np.uint8) ^ 0x80)
        # a non-contiguous view is staged and written back through its strides
        backing = original[:20_000].copy()
        strided = backing[::2]
        client.echo(strided, mode=2)
        assert np.array_equal(backing[::2].copy().view(np.uint8),
                              original[:20_000:2].copy().view(np.uint8) ^ 0x80)
        assert np.array_equal(backing[1::2].view(np.uint32).copy(),
                              original[1:20_000:2].view(np.uint32).copy())


def test_shared_arrays_are_not_copied(swarm: list[DaemonProcess]) -> None:
    with swarm[1].client() as client:
        shared = client.empty((1000, 10))
        shared[...] = 1.0
        ref = client._pool.locate(shared[10:20], "<f4")
        assert ref is not None and ref.offset == 10 * 10 * 4 and ref.dtype == "<f4"
        client.echo(shared[10:20], mode=2)
        flipped = (np.ones(1, np.float32).view(np.uint8) ^ 0x80).view(np.float32)[0]
        assert np.all(shared[10:20] == flipped) and np.all(shared[:10] == 1.0)
