"""All-reduce through real daemons: three ``peerd start`` processes, one client
each (threads of this process), tensors handed over through shared memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from collectives.api import Quant, ReduceOp, View
from peerd.client import Client
from peerd.daemon.launcher import DaemonProcess
from peerd.errors import ConfigError, Evicted, PeerLost

RUN = "daemon-test"


@pytest.fixture(scope="module")
def clients(swarm: list[DaemonProcess]) -> Iterator[list[Client]]:
    clients = [dm.client(run=RUN) for dm in swarm]
    members = [c.peer_id for c in clients]
    try:
        with ThreadPoolExecutor(3) as pool:
            views = list(pool.map(lambda c: c.join(members, timeout=30.0), clients))
        assert all(set(v.members) == set(members) for v in views)
        yield clients
    finally:
        for c in clients:
            c.close()


def on_all(clients: list[Client], fn: Callable[[int, Client], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(lambda ic: fn(*ic), enumerate(clients)))


def test_average_is_exact_and_identical_everywhere(clients: list[Client]) -> None:
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal(300_001).astype(np.float32) for _ in clients]
    arrays = [a.copy() for a in inputs]
    results = on_all(clients, lambda i, c: c.all_reduce(arrays[i], ReduceOp.AVG))
    ids = {c.peer_id for c in clients}
    assert all(set(r.participants) == ids for r in results)
    expected = (inputs[0] + inputs[1] + inputs[2]) / np.float32(3)
    for a in arrays:
        assert np.array_equal(a.view(np.uint32), arrays[0].view(np.uint32))  # bit-identical
        np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-6)
    assert all(r.bytes_sent > 0 for r in results)


def test_async_handles_with_torch_and_shared_arrays(clients: list[Client]) -> None:
    tensors = [torch.full((1000, 7), float(i + 1)) for i in range(3)]
    shared = [c.empty(5000) for c in clients]
    for i, s in enumerate(shared):
        s[...] = 10.0 * i

    def work(i: int, c: Client) -> None:
        h1 = c.all_reduce_async(tensors[i], "sum", tag="t")
        h2 = c.all_reduce_async(shared[i], "avg", tag="s", quant=Quant.NONE)
        h1.wait(timeout=60)
        h2.wait(timeout=60)

    on_all(clients, work)
    for t in tensors:
        assert torch.equal(t, torch.full((1000, 7), 6.0))
    for s in shared:
        assert np.all(s == 10.0)


def test_out_shared_and_staged_gives_the_in_place_bytes(clients: list[Client]) -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal(200_003).astype(np.float32) for _ in clients]
    in_place = [a.copy() for a in inputs]
    on_all(clients, lambda i, c: c.all_reduce(in_place[i], tag="in-place"))
    # Staged input and out; then shared ones, which the daemon's ring runs in.
    outs = [np.zeros_like(a) for a in inputs]
    on_all(clients, lambda i, c: c.all_reduce(inputs[i], tag="staged", out=outs[i]))
    src = [c.empty(a.size) for a, c in zip(inputs, clients, strict=True)]
    dst = [c.empty(a.size) for a, c in zip(inputs, clients, strict=True)]
    for s, a in zip(src, inputs, strict=True):
        s[...] = a
    on_all(clients, lambda i, c: c.all_reduce(src[i], tag="shared", out=dst[i]))
    for i, a in enumerate(inputs):
        assert np.array_equal(src[i], a)  # the input is only read
        assert outs[i].tobytes() == in_place[0].tobytes() == dst[i].tobytes()


def test_view_lists_every_member(clients: list[Client]) -> None:
    views = [c.view() for c in clients]
    assert {v.me for v in views} == {c.peer_id for c in clients}
    assert all(v.members == views[0].members for v in views)
    assert all(RUN in c.status().runs for c in clients)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().tobytes()


def test_bfloat16_tensors_staged_shared_strided_and_into_out(clients: list[Client]) -> None:
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(100_003, generator=gen).to(torch.bfloat16) for _ in clients]
    in_place = [t.clone() for t in inputs]
    results = on_all(clients, lambda i, c: c.all_reduce(in_place[i], tag="bf16"))
    assert all(set(r.participants) == {c.peer_id for c in clients} for r in results)
    assert all(t.dtype == torch.bfloat16 for t in in_place)
    assert bits(in_place[1]) == bits(in_place[0]) == bits(in_place[2])  # bit-identical
    exact = torch.stack([t.double() for t in inputs]).mean(0)
    # Partial sums travel as bfloat16 (rounded at every ring step), as on the node.
    torch.testing.assert_close(in_place[0].double(), exact, rtol=2e-2, atol=2e-2)
    # Into out= (the input is only read), from shared memory, and strided: same bits.
    outs = [torch.empty_like(t) for t in inputs]
    on_all(clients, lambda i, c: c.all_reduce(inputs[i], tag="bf16", out=outs[i]))
    shared = [torch.from_numpy(c.empty(t.numel(), np.uint16)).view(torch.bfloat16)
              for t, c in zip(inputs, clients, strict=True)]
    for s, t in zip(shared, inputs, strict=True):
        s.copy_(t)
    on_all(clients, lambda i, c: c.all_reduce(shared[i], tag="bf16"))
    wide = [torch.zeros(2 * t.numel(), dtype=torch.bfloat16) for t in inputs]
    for w, t in zip(wide, inputs, strict=True):
        w[::2] = t
    on_all(clients, lambda i, c: c.all_reduce(wide[i][::2], tag="bf16"))
    for i in range(len(clients)):
        assert bits(outs[i]) == bits(shared[i]) == bits(wide[i][::2]) == bits(in_place[0])
        assert not wide[i][1::2].any()  # the gaps between the elements untouched
        assert not torch.equal(inputs[i], in_place[0])  # inputs were only read


def test_bfloat16_gathers_as_bfloat16_and_a_float32_out_is_refused(clients: list[Client]) -> None:
    tensors = [torch.full((5,), 1.5 + i, dtype=torch.bfloat16) for i in range(len(clients))]
    gathered = on_all(clients, lambda i, c: c.all_gather(tensors[i], tag="bf16-gather"))
    order = {c.peer_id: t for c, t in zip(clients, tensors, strict=True)}
    for arrays, peers in gathered:
        assert [a.dtype for a in arrays] == [torch.bfloat16] * len(clients)
        assert all(torch.equal(a, order[p]) for a, p in zip(arrays, peers, strict=True))
    with pytest.raises(ConfigError, match="out holds 5 float32 elements but the input 5 "
                                          "bfloat16: pass an out of the input's size and dtype"):
        clients[0].all_reduce(tensors[0], out=torch.zeros(5))


def test_bfloat16_state_syncs_to_the_popular_bits(clients: list[Client]) -> None:
    popular = torch.linspace(-3, 3, 4099).to(torch.bfloat16)
    states = [{"w": popular.clone(), "b": torch.ones(7, dtype=torch.bfloat16)}
              for _ in clients]
    states[2]["w"] += 1  # the odd one out
    results = on_all(clients, lambda i, c: c.sync_state(states[i], 5))
    assert "w" in results[2].tensors_received
    for s in states:
        assert s["w"].dtype == torch.bfloat16 and bits(s["w"]) == bits(popular)
        assert bits(s["b"]) == bits(torch.ones(7, dtype=torch.bfloat16))


def test_update_view_admits_a_joiner_into_a_loop_of_all_reduces(
        swarm: list[DaemonProcess]) -> None:
    """A custom loop of all-reduces admits nobody by itself; the members'
    ``update_view()`` is the round boundary that lets a waiting joiner in."""
    with clients_of("grows", swarm) as everyone:
        members, joiner = everyone[:2], everyone[2]
        founders = [c.peer_id for c in members]
        on_all(members, lambda i, c: c.join(founders, timeout=30.0))

        def member(i: int, c: Client) -> tuple[int, np.ndarray]:
            boundaries = 0
            while True:
                boundaries += 1
                view = c.update_view()
                if joiner.peer_id in view.members:
                    break
                assert boundaries < 600, "the joiner was never admitted"
                c.all_reduce(np.ones(10, np.float32))  # a step of the loop, joiner or not
                time.sleep(0.05)  # a training step's work
            x = np.full(10, float(i), np.float32)
            c.all_reduce(x)
            return boundaries, x

        def joining() -> tuple[int, np.ndarray]:
            view = joiner.join(timeout=60.0)
            assert set(view.members) == {*founders, joiner.peer_id}
            x = np.full(10, 5.0, np.float32)
            joiner.all_reduce(x)
            return 0, x

        results = on_all(everyone, lambda i, c: joining() if c is joiner else member(i, c))
        assert all(b >= 1 for b, _ in results[:2])
        for _, x in results:
            assert np.array_equal(x, np.full(10, 2.0, np.float32))  # (0 + 1 + 5) / 3


def test_a_training_process_gone_without_leaving_takes_its_daemon_out_of_the_run(
        swarm: list[DaemonProcess], wait_until: Callable[..., None]) -> None:
    """The daemon leaves the runs whose collectives its client took part in
    when that client's connection closes (the script ended, crashed or was
    killed): the others' next round goes on without it at once, not after a
    phase deadline."""
    run = "orphaned"
    with clients_of(run, swarm) as clients:
        ids = [c.peer_id for c in clients]
        on_all(clients, lambda i, c: c.join(ids, timeout=30.0))
        on_all(clients, lambda i, c: c.all_reduce(np.ones(10, np.float32)))
        clients[2].close()  # no leave(): the process just ends
        with swarm[2].client() as watcher:
            wait_until(lambda: run not in watcher.status().runs)
            assert "daemon.left_run" in swarm[2].log_path.read_text()
        survivors = clients[:2]
        xs = [np.full(10, float(i), np.float32) for i in range(2)]
        results = on_all(survivors, lambda i, c: c.all_reduce(xs[i]))
        for r, x in zip(results, xs, strict=True):
            assert set(r.participants) == set(ids[:2])
            assert np.array_equal(x, np.full(10, 0.5, np.float32))
        assert all(set(c.view().members) == set(ids[:2]) for c in survivors)


def test_a_member_that_never_starts_the_round_is_dropped_at_the_phase_timeout(
        swarm: list[DaemonProcess]) -> None:
    """Three daemons with a 2 s phase timeout; one member's training process
    is alive and connected but never calls the all-reduce. The other two go
    on without it, both naming it; its own next call is told it was left out,
    and it comes back in at the next round boundary."""
    with clients_of("straggler", swarm) as clients:
        ids = [c.peer_id for c in clients]
        late, survivors = clients[0], clients[1:]
        on_all(clients, lambda i, c: c.join(ids, timeout=30.0, phase_timeout=2.0))
        with ThreadPoolExecutor(2) as pool:
            lost = list(pool.map(lambda c: _lost_in(c), survivors))
        for exc in lost:
            assert exc.peers == (late.peer_id,)
            assert "never started this all-reduce" in str(exc)
        xs = [np.full(10, float(i + 1), np.float32) for i in range(2)]
        results = on_all(survivors, lambda i, c: c.all_reduce(xs[i]))
        for r, x in zip(results, xs, strict=True):
            assert set(r.participants) == set(ids[1:])
            assert np.array_equal(x, np.full(10, 1.5, np.float32))
        with pytest.raises(Evicted):
            late.all_reduce(np.ones(10, np.float32))
        _readmitted_and_averaging(clients, late, lambda: late.join(timeout=30.0))


def test_in_a_pair_a_member_that_never_starts_is_named_at_the_phase_timeout(
        swarm: list[DaemonProcess]) -> None:
    """Two daemons, a 2 s phase timeout and a 20 MB tensor, whose data phases
    allow 2 s + 20 MB at the minimum bandwidth (18 s). The member whose
    training process never calls is the other's left (and right) neighbour;
    its absence is found at the phase timeout all the same."""
    with clients_of("pair", swarm[:2]) as clients:
        ids = [c.peer_id for c in clients]
        late, waiting = clients
        on_all(clients, lambda i, c: c.join(ids, timeout=30.0, phase_timeout=2.0))
        x = np.ones(5_000_000, np.float32)
        start = time.monotonic()
        with pytest.raises(PeerLost) as caught:
            waiting.all_reduce(x, retry=False)
        assert time.monotonic() - start < 12.0  # the data deadline is 18 s away
        assert caught.value.peers == (late.peer_id,)
        assert "never started this all-reduce" in str(caught.value)
        assert np.array_equal(x, np.ones(5_000_000, np.float32))


def test_a_member_that_never_comes_to_the_boundary_is_dropped_at_the_phase_timeout(
        swarm: list[DaemonProcess]) -> None:
    """As above, at a round boundary: one member's training process never
    calls ``update_view`` (as a Streaming DiLoCo member stuck before its
    ``sync_state``, its overlapped collective done). The others' boundary
    goes on without it after the run's phase timeout (2 s), not the default
    view timeout (60 s); it comes back in at the boundary after."""
    with clients_of("absent-at-boundary", swarm) as clients:
        ids = [c.peer_id for c in clients]
        late, survivors = clients[0], clients[1:]
        on_all(clients, lambda i, c: c.join(ids, timeout=30.0, phase_timeout=2.0))
        on_all(clients, lambda i, c: c.all_reduce(np.ones(10, np.float32)))  # all take part
        with ThreadPoolExecutor(2) as pool:
            views = [pool.submit(c.update_view) for c in survivors]
            # A deadline, not a wait: without the run's timeout this takes 60 s.
            assert all(set(v.result(timeout=20).members) == set(ids[1:]) for v in views)
        # Its own next boundary takes it back in: a boundary is where the dropped rejoin.
        _readmitted_and_averaging(clients, late, late.update_view)


def _readmitted_and_averaging(clients: list[Client], late: Client,
                              come_back: Callable[[], View]) -> None:
    """``late`` comes back with ``come_back`` while the others run their loop
    (a boundary per step) until a view includes it; then all three average."""
    def boundary(i: int, c: Client) -> View:
        if c is late:
            return come_back()
        view = c.update_view()
        ends = time.monotonic() + 60.0  # bounded: a failed come-back fails the test
        while late.peer_id not in view.members and time.monotonic() < ends:
            time.sleep(0.05)  # a step of the loop
            view = c.update_view()
        return view

    ids = {c.peer_id for c in clients}
    views = on_all(clients, boundary)
    assert all(set(v.members) == ids for v in views)
    xs = [np.full(10, float(i), np.float32) for i in range(3)]
    results = on_all(clients, lambda i, c: c.all_reduce(xs[i]))
    assert all(set(r.participants) == ids for r in results)
    assert all(np.array_equal(x, np.full(10, 1.0, np.float32)) for x in xs)


def _lost_in(c: Client) -> PeerLost:
    with pytest.raises(PeerLost) as caught:
        c.all_reduce(np.ones(10, np.float32), retry=False)
    return caught.value


@contextlib.contextmanager
def clients_of(run: str, daemons: list[DaemonProcess]) -> Iterator[list[Client]]:
    """A client of ``run`` on each daemon; on the way out each leaves the run
    (where it still can: a test may have closed it) and is closed."""
    clients = [dm.client(run=run) for dm in daemons]
    try:
        yield clients
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.leave()
            c.close()
