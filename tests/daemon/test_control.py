"""The control server and client end to end in one process, over a real Unix
socket, against a fake node that has every feature the collectives engine, DHT
and store will add. This checks the forwarding now, with the exact signatures."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio

import peerd
from collectives.api import AllReduceResult, Quant, SyncResult, SyncStrategy, View
from collectives.driver import EngineConfig
from peerd.daemon.control import serve_control
from peerd.daemon.service import ControlService
from peerd.errors import ConfigError, PeerLost, RemoteError
from peerd.identity import Identity, SwarmKey


@dataclass(frozen=True)
class FakeStats:
    peers: int = 0
    handshakes_ok: int = 5


class FakeDht:
    def __init__(self) -> None:
        self.data: dict[bytes, Any] = {}

    async def put(self, key: bytes, value: Any, ttl: float) -> int:
        self.data[key] = value
        return 3

    async def get(self, key: bytes) -> dict[bytes | None, Any]:
        return {None: self.data[key]} if key in self.data else {}


class FakeDoc:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


class FakeStore:
    def __init__(self) -> None:
        self.docs: dict[str, FakeDoc] = {}

    def doc(self, name: str) -> FakeDoc:
        return self.docs.setdefault(name, FakeDoc())


class FakeNode:
    def __init__(self) -> None:
        self.peer_id = Identity.from_seed(b"fake").peer_id
        self.swarm_key = SwarmKey(b"k" * 32)
        self.listen_addresses = ["127.0.0.1:9"]
        self.observed: dict[Any, Any] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.outs: list[bool] = []  # per all-reduce: did the daemon get a destination?
        self.configs: list[EngineConfig | None] = []  # per join
        self.gate = trio.Event()
        self.dht = FakeDht()
        self.store = FakeStore()

    def peers(self) -> list[Any]:
        return []

    def statistics(self) -> FakeStats:
        return FakeStats()

    async def all_reduce(self, run: str, array: np.ndarray, op: str = "avg", *,
                         tag: str = "default", quant: Quant = Quant.NONE,
                         retry: bool = True, out: np.ndarray | None = None) -> AllReduceResult:
        self.calls.append((run, op, tag, quant, retry, array.dtype.str, array.shape))
        self.outs.append(out is not None)
        dest = array if out is None else out
        if tag == "lost":
            dest[...] = -999  # a failed round may scribble; the client must not copy back
            raise PeerLost(["pgone"], "vanished mid-round")
        if tag == "gate":
            await self.gate.wait()
        np.multiply(array, 2, out=dest)
        return AllReduceResult(("pa", "pb"), 3, array.nbytes, array.nbytes, 0.5, 2)

    async def join_run(self, run: str, members: list[str] | None = None,
                       config: EngineConfig | None = None, timeout: float | None = None) -> None:
        self.calls.append(("join", run, members, timeout))
        self.configs.append(config)

    async def leave_run(self, run: str) -> None:
        self.calls.append(("leave", run))

    def view(self, run: str) -> View:
        return View(run, 3, ("pa", "pb"), "pa")

    async def update_view(self, run: str) -> View:
        self.calls.append(("update_view", run))
        return View(run, 4, ("pa", "pb", "pc"), "pa")

    async def all_gather(self, run: str, array: np.ndarray, tag: str = "gather",
                         retry: bool = True) -> tuple[list[np.ndarray], tuple[str, ...]]:
        return [array.copy(), np.arange(5, dtype=np.int64)], ("pa", "pb")

    async def sync_state(self, run: str, state: dict[str, np.ndarray], revision: int,
                         strategy: SyncStrategy) -> SyncResult:
        for arr in state.values():
            arr[...] = revision
        return SyncResult(revision, ("pa",), tuple(state), 8, 0)

    async def send(self, run: str, peer: Any, array: np.ndarray, tag: str = "p2p") -> None:
        self.calls.append(("send", run, peer.text, tag, float(array.sum())))

    async def recv(self, run: str, peer: Any, tag: str = "p2p") -> np.ndarray:
        return np.full((2, 3), 4.0, dtype=np.float32)


def hung_up(s: socket.socket) -> bool:
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


async def with_daemon(path: Path, node: Any, body: Callable[[], None]) -> ControlService:
    service = ControlService(node, trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, service, 4, 8)
        await trio.to_thread.run_sync(body)
        nursery.cancel_scope.cancel()
    assert not path.exists()
    return service


async def test_all_reduce_is_forwarded_with_the_engine_signature(short_dir: Path) -> None:
    node = FakeNode()
    sock = short_dir / "c.sock"

    def body() -> None:
        with peerd.connect(sock, run="r1") as c:
            assert set(c.features) == {"join_run", "all_reduce", "view", "update_view",
                                       "all_gather", "sync_state", "send", "recv", "dht",
                                       "store"}
            a = np.arange(6, dtype=np.float32).reshape(2, 3)
            res = c.all_reduce(a, "sum", tag="t", quant=Quant.INT8, retry=False)
            assert res == AllReduceResult(("pa", "pb"), 3, 24, 24, 0.5, 2)
            assert np.array_equal(a, 2 * np.arange(6, dtype=np.float32).reshape(2, 3))
            t = torch.ones(4, dtype=torch.float64)
            c.all_reduce(t, run="other")
            assert torch.equal(t, torch.full((4,), 2.0, dtype=torch.float64))
            shared = c.empty(8)
            shared[...] = 3.0
            c.all_reduce(shared)
            assert np.all(shared == 6.0)
            assert c.status().runs == ("other", "r1")

    await with_daemon(sock, node, body)
    assert node.calls[0] == ("r1", "sum", "t", Quant.INT8, False, "<f4", (2, 3))
    assert node.calls[1][:5] == ("other", "avg", "default", Quant.NONE, True)
    # Staged arrays are reduced into a segment of their own (the engine's ring
    # then runs in it, no copy); a shared array is reduced where it is.
    assert node.outs == [True, True, False]


async def test_out_gets_the_result_and_the_input_stays(short_dir: Path) -> None:
    node = FakeNode()
    sock = short_dir / "c.sock"

    def body() -> None:
        with peerd.connect(sock) as c:
            a = np.arange(5, dtype=np.float32)
            out = np.zeros(5, dtype=np.float32)
            c.all_reduce(a, "sum", out=out)
            assert np.array_equal(a, np.arange(5)) and np.array_equal(out, 2 * np.arange(5))
            # Shared in and out: the daemon reads one segment and writes the other.
            src, dst = c.empty(6), c.empty(6)
            src[...] = 4.0
            c.all_reduce(src, out=dst)
            assert np.all(src == 4.0) and np.all(dst == 8.0)
            t, t_out = torch.ones(3), torch.zeros(3)
            c.all_reduce(t, out=t_out)
            assert torch.equal(t, torch.ones(3)) and torch.equal(t_out, torch.full((3,), 2.0))
            # A failed round copies nothing back: neither the input nor out changes.
            kept = np.full(4, 5.0, dtype=np.float32)
            untouched = np.full(4, 7.0, dtype=np.float32)
            with pytest.raises(PeerLost):
                c.all_reduce(kept, tag="lost", out=untouched)
            assert np.all(kept == 5.0) and np.all(untouched == 7.0)
            calls = len(node.calls)
            for bad, match in [(np.zeros(4, np.float32), "out holds 4 float32 elements"),
                               (np.zeros(5, np.float16), "out holds 5 float16"),
                               (a[1:4], "out holds 3")]:
                with pytest.raises(ConfigError, match=match):
                    c.all_reduce(a, out=bad)
            with pytest.raises(ConfigError, match="overlaps the input"):
                c.all_reduce(src[:4], out=src[2:])
            assert len(node.calls) == calls  # refused before any request

    await with_daemon(sock, node, body)
    assert node.outs == [True, True, True, True]


async def test_async_handles_overlap_and_failures_leave_inputs_intact(short_dir: Path) -> None:
    node = FakeNode()
    sock = short_dir / "c.sock"

    def body() -> None:
        with peerd.connect(sock) as c:
            gated = np.ones(1000, dtype=np.float32)
            h = c.all_reduce_async(gated, tag="gate")
            quick = np.ones(10, dtype=np.float32)
            c.all_reduce(quick)  # completes while the first is still in flight
            assert np.all(quick == 2) and not h.done()
            trio.from_thread.run_sync(node.gate.set)
            assert h.wait(timeout=10).participants == ("pa", "pb")
            assert np.all(gated == 2)
            kept = np.full(7, 5.0, dtype=np.float32)
            with pytest.raises(PeerLost) as info:
                c.all_reduce(kept, tag="lost")
            assert info.value.peers == ("pgone",)
            assert np.all(kept == 5.0)

    await with_daemon(sock, node, body)


async def test_view_gather_sync_p2p_dht_and_store(short_dir: Path) -> None:
    node = FakeNode()
    sock = short_dir / "c.sock"
    peer = Identity.from_seed(b"other").peer_id.text

    def body() -> None:
        with peerd.connect(sock, run="r") as c:
            assert c.join(["pa", "pb"], timeout=3.0) == View("r", 3, ("pa", "pb"), "pa")
            assert c.view() == View("r", 3, ("pa", "pb"), "pa")
            assert c.update_view() == View("r", 4, ("pa", "pb", "pc"), "pa")
            c.leave()
            arrays, peers = c.all_gather(np.full(3, 1.5, dtype=np.float32))
            assert peers == ("pa", "pb")
            assert np.array_equal(arrays[0], np.full(3, 1.5, dtype=np.float32))
            assert np.array_equal(arrays[1], np.arange(5))
            state = {"w": np.zeros(4, dtype=np.float32), "b": torch.zeros(2)}
            res = c.sync_state(state, 9)
            assert res.tensors_received == ("w", "b") and res.revision == 9
            assert np.all(state["w"] == 9) and torch.all(state["b"] == 9)
            c.send(peer, np.ones(3, dtype=np.float32), tag="x")
            assert np.array_equal(c.recv(peer), np.full((2, 3), 4.0, dtype=np.float32))
            assert c.dht_put("k", b"v") == 3
            assert c.dht_get("k") == {None: b"v"}
            assert c.dht_get("missing") == {}
            c.store_set("run/r", "lr", 0.5)
            assert c.store_get("run/r", "lr") == 0.5
            assert c.store_get("run/r") == {"lr": 0.5}

    await with_daemon(sock, node, body)
    assert ("send", "r", peer, "x", 3.0) in node.calls
    assert node.calls[:3] == [("join", "r", ["pa", "pb"], 3.0), ("update_view", "r"),
                              ("leave", "r")]


class BareNode(FakeNode):
    all_reduce = None  # type: ignore[assignment]
    dht = None  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.dht = None


async def test_missing_features_are_named(short_dir: Path) -> None:
    sock = short_dir / "c.sock"

    def body() -> None:
        with peerd.connect(sock) as c:
            a = np.ones(3, dtype=np.float32)
            with pytest.raises(RemoteError, match="no all_reduce support"):
                c.all_reduce(a)
            assert np.all(a == 1)
            with pytest.raises(RemoteError, match="no dht support"):
                c.dht_get("k")

    await with_daemon(sock, BareNode(), body)


class BuggyNode(FakeNode):
    async def join_run(self, run: str, members: list[str] | None = None,
                       config: EngineConfig | None = None, timeout: float | None = None) -> None:
        raise RuntimeError("a bug under join_run")


async def test_a_bug_in_one_request_fails_that_request_only(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = short_dir / "c.sock"

    def body() -> None:
        with peerd.connect(sock) as c, peerd.connect(sock) as other:
            with pytest.raises(RemoteError) as caught:
                c.join(["pa"])
            assert caught.value.kind == "InternalError"
            assert "JoinRunRequest (RuntimeError: a bug under join_run)" in caught.value.message
            assert "report it with the daemon's log" in caught.value.message
            # The same connection, another one and a new one all go on.
            assert c.status().peer_id == other.status().peer_id
            a = np.ones(3, dtype=np.float32)
            c.all_reduce(a)
            assert np.all(a == 2)
        with peerd.connect(sock) as late:
            assert late.status().counters["request_errors"] == 1

    await with_daemon(sock, BuggyNode(), body)
    assert "a bug under join_run" in caplog.text  # the traceback is in the log


async def test_garbage_and_unsealed_descriptors_do_not_hurt_the_daemon(short_dir: Path) -> None:
    sock = short_dir / "c.sock"

    def body() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(sock))
        s.sendall(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")  # invalid msgpack
        assert hung_up(s)  # the daemon hangs up on this client only
        s.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(sock))
        s.sendall(struct.pack(">I", 0xFFFFFFF0))  # absurd frame length
        assert hung_up(s)
        s.close()
        with peerd.connect(sock) as c:
            from peerd.daemon import protocol as p
            from peerd.errors import ProtocolError

            fd = os.memfd_create("unsealed")
            os.ftruncate(fd, 4096)
            with pytest.raises(ProtocolError, match="not sealed"):
                c._conn.call(lambda r: p.RegisterSegment(r, 77, 4096), 5.0, (fd,))
            os.close(fd)
            bad = p.TensorRef(12345, 0, "<f4", (3,))
            with pytest.raises(ProtocolError, match="unknown shared segment"):
                c._conn.call(lambda r: p.EchoRequest(r, bad, 0), 5.0)
            assert c.status().peer_id == c.peer_id

    service = await with_daemon(sock, FakeNode(), body)
    assert service.counters["clients_total"] == 3


async def test_a_client_gone_leaves_the_runs_it_alone_took_part_in(
        short_dir: Path, wait_until: Callable[..., None]) -> None:
    node = FakeNode()
    sock = short_dir / "c.sock"
    x = np.ones(3, dtype=np.float32)

    def body() -> None:
        with peerd.connect(sock, run="launched") as launcher:
            launcher.join(["pa", "pb"])  # joins on the trainers' behalf, as peerd demo does
        first, second = peerd.connect(sock, run="shared"), peerd.connect(sock, run="shared")
        first.all_reduce(x)
        second.all_reduce(x)
        first.all_reduce(x, run="mine")
        with peerd.connect(sock, run="kept") as third:
            third.all_reduce(x)
            third.leave()  # left already: nothing to leave when it closes
        first.close()  # "mine" was its alone; "shared" is second's too
        wait_until(lambda: ("leave", "mine") in node.calls)
        assert ("leave", "shared") not in node.calls
        second.close()
        wait_until(lambda: ("leave", "shared") in node.calls)

    service = await with_daemon(sock, node, body)
    leaves = [c for c in node.calls if c[0] == "leave"]
    assert sorted(leaves) == [("leave", "kept"), ("leave", "mine"), ("leave", "shared")]
    assert service.runs == {"launched"}  # joined, and its trainers may come yet


async def test_join_passes_a_phase_timeout_and_refuses_a_bad_one(short_dir: Path) -> None:
    node = FakeNode()
    sock = short_dir / "c.sock"

    def body() -> None:
        with peerd.connect(sock, run="r") as c:
            c.join(["pa", "pb"])
            c.join(["pa", "pb"], phase_timeout=600)
            for bad in (0, -5.0, float("inf"), float("nan")):
                with pytest.raises(ConfigError, match="phase_timeout must be a positive number"):
                    c.join(["pa", "pb"], phase_timeout=bad)

    await with_daemon(sock, node, body)
    assert len(node.configs) == 2  # the bad ones never reached the node
    assert node.configs[0] is None
    assert node.configs[1] is not None and node.configs[1].phase_timeout == 600.0
    assert node.configs[1].timing.view_timeout == 600.0  # its round boundaries wait as long
