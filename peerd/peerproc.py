"""A scripted peer process, and its driver, for multi-process tests and benchmarks.

``python -m peerd.peerproc KEYHEX INDEX`` runs a real node on loopback, prints
``{"event": "ready", ...}`` and then executes JSON commands read line by line
from stdin, answering each with one JSON event line on stdout. Inputs of an
all-reduce are a pure function of (seed, index, round), so a driver can
recompute the exact reference for whichever participants a result names.

Faults are injected at named phases from inside the victim, so the timing is
exact: ``die_at="before"`` SIGKILLs the process as the round starts,
``"r:N"`` / ``"g:N"`` on its N-th send of reduce-scatter / all-gather data.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from peerd.errors import PeerdError, PeerLost

READY_TIMEOUT = 60.0


def make_input(seed: int, index: int, round_: int, size: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng([seed, index, round_])
    # Drawn as fp32 directly: no fp64 temporary twice the tensor's size.
    data = rng.standard_normal(size, dtype=np.float32)
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
    return data.astype(dtype)


def digest(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()


# ---------------------------------------------------------------- the peer


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so a later ``rss_peak`` sees
    only what happened since; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_times() -> tuple[float, float, int]:
    """This process's (user, kernel) CPU seconds and minor page faults so
    far, all threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def rss_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _FaultFabric:
    """Wraps the node's fabric; SIGKILLs this process at a named phase."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.die_at: tuple[bytes, int] | None = None
        self._count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def me(self) -> str:
        return str(self._inner.me)

    async def send_data(self, peer: str, key: bytes, data: Any) -> None:
        if self.die_at is not None and b"/" + self.die_at[0] + b"/" in key:
            self._count += 1
            if self._count >= self.die_at[1]:
                os.kill(os.getpid(), signal.SIGKILL)
        await self._inner.send_data(peer, key, data)


async def _peer_main(key_hex: str, index: int, listen: str = "127.0.0.1:0") -> None:
    from peerd.config import NodeConfig
    from peerd.heap import freeze_startup_heap
    from peerd.identity import SwarmKey
    from peerd.jsonlines import commands, emit
    from peerd.node import open_node

    # Import torch before the node runs: a multi-second import inside a round
    # would block the event loop past the heartbeat timeout. Tests that never
    # touch tensors (the NAT lab) skip it to start faster.
    if not os.environ.get("PEERD_PEERPROC_NO_TORCH"):
        import torch  # noqa: F401

    if level := os.environ.get("PEERD_PEERPROC_LOG"):  # e.g. "info", to explain a failure
        logging.basicConfig(level=level.upper(), stream=sys.stderr,
                            format="%(relativeCreated)d %(name)s %(message)s")
    # Tests of the threaded data path force it on or off whatever the cores.
    threads = os.environ.get("PEERD_PEERPROC_DATA_THREADS")
    # Benchmarks sweep the transport's knobs through the environment.
    config = NodeConfig(
        data_threads=None if threads is None else threads == "1",
        data_channels=int(os.environ.get("PEERD_PEERPROC_DATA_CHANNELS", "0"))
        or NodeConfig.data_channels,
        data_record=int(os.environ.get("PEERD_PEERPROC_DATA_RECORD", "0"))
        or NodeConfig.data_record,
        data_congestion=os.environ.get("PEERD_PEERPROC_DATA_CONGESTION")
        or NodeConfig.data_congestion)
    async with open_node(SwarmKey(bytes.fromhex(key_hex)), listen=listen,
                         config=config) as node:
        fault = _FaultFabric(node.fabric)
        node.fabric = fault  # type: ignore[assignment]
        freeze_startup_heap()
        emit(event="ready", index=index, peer=node.peer_id.text,
             addr=node.listen_addresses[0], pid=os.getpid())
        prepared: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        finished: dict[int, Callable[[], Awaitable[dict[str, Any]]]] = {}
        async for cmd in commands():
            try:
                emit(**await _command(node, fault, index, cmd, prepared, finished))
            except PeerdError as exc:
                emit(event="error", kind=type(exc).__name__, message=str(exc),
                     peers=list(getattr(exc, "peers", ())))


def _inputs(index: int, cmd: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """This peer's input of an all-reduce command, and a copy to check it against."""
    data = make_input(cmd["seed"], index, cmd["round"], cmd["size"], cmd.get("dtype", "float32"))
    if cmd.get("into"):
        _destination(data)
    return data, data.copy()


async def _intact(data: np.ndarray, original: np.ndarray) -> bool:
    """Whether ``data`` still holds the bytes of ``original`` (compared on a thread)."""
    import trio

    return bool(await trio.to_thread.run_sync(np.array_equal, data.view(np.uint8),
                                              original.view(np.uint8)))


# The result buffer of ``into`` commands, kept from round to round as a
# training loop keeps its own (one at a time: the last shape and dtype).
_DEST: list[np.ndarray] = []


def _destination(like: np.ndarray) -> np.ndarray:
    if not _DEST or _DEST[0].shape != like.shape or _DEST[0].dtype != like.dtype:
        _DEST[:] = [np.zeros_like(like)]  # written now: its pages are mapped before the timer
    return _DEST[0]


async def _command(
    node: Any, fault: _FaultFabric, index: int, cmd: dict[str, Any],
    prepared: dict[int, tuple[np.ndarray, np.ndarray]],
    finished: dict[int, Callable[[], Awaitable[dict[str, Any]]]],
) -> dict[str, Any]:
    import trio

    from collectives.api import Quant
    from collectives.driver import EngineConfig

    kind = cmd["cmd"]
    if kind == "connect":
        peer = await node.connect(cmd["addr"])
        return {"event": "connected", "peer": peer.text}
    if kind == "join":
        members = cmd.get("members")
        # Benchmarks sweep the ring's pipelining unit (bytes; unset: automatic).
        sub = int(os.environ.get("PEERD_PEERPROC_SUB_CHUNK_BYTES", "0"))
        engine = await node.join_run(cmd["run"], members, timeout=cmd.get("timeout"),
                                     config=EngineConfig(sub_chunk_bytes=sub))
        return {"event": "joined", "view": list(engine.view().members),
                "revision": engine.view().revision}
    if kind == "update_view":
        view = await node.engine(cmd["run"]).update_view()
        return {"event": "view", "view": list(view.members), "revision": view.revision}
    if kind == "links":
        engine = node.engine(cmd["run"])
        others = [p for p in engine.view().members if p != engine.me]
        return {"event": "links", "bandwidth": {p: engine.link_bandwidth(p) for p in others}}
    if kind == "prepare":
        # Inputs are made before the timed call so that one slow peer drawing
        # random numbers does not show up as all-reduce time on the others.
        # Bulk work on the inputs runs on a thread throughout: seconds of it on
        # the event loop (100M elements) would silence this peer's heartbeats.
        prepared[cmd["round"]] = await trio.to_thread.run_sync(_inputs, index, cmd)
        # Earlier rounds' arrays caught in cycles must not offset the peak. Collected
        # here, before the driver's barrier: a collection takes a tenth of a second
        # with a node's objects, and between the barrier and the timer it would delay
        # this peer's start, which the others would then count as all-reduce time.
        gc.collect()
        return {"event": "prepared", "round": cmd["round"]}
    if kind == "allreduce":
        rnd = cmd["round"]
        if rnd in prepared:
            data, original = prepared.pop(rnd)
        else:  # not prepared: collected here, as "prepare" does (see there)
            data, original = await trio.to_thread.run_sync(_inputs, index, cmd)
            gc.collect()
        prepared.clear()
        die = cmd.get("die_at")
        if die == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if die:
            phase, _, n = die.partition(":")
            fault.die_at = (phase.encode(), int(n or 1))
        # ``into``: the result goes to a buffer of its own (``out=``), the input is only read;
        # ``_inputs`` made it, on its thread, for this very input.
        dest = _destination(data) if cmd.get("into") else None
        target: Any = data
        into: Any = dest
        if cmd.get("dtype", "float32") == "bfloat16":
            import torch

            target = torch.from_numpy(data).view(torch.bfloat16)
            into = None if dest is None else torch.from_numpy(dest).view(torch.bfloat16)
        rss_before = rss_now() if reset_rss_peak() else rss_peak()
        if (at := cmd.get("start_at")) is not None:
            # All peers start together, as after gloo's barrier: commands reach
            # the peers one after another, milliseconds apart on a busy host.
            await trio.sleep(max(0.0, at - time.monotonic()))
        # Monotonic clock stamps too: ``perf record -k CLOCK_MONOTONIC`` then
        # profiles exactly the all-reduce (``perf report --time start,end``).
        started, t0, (user0, sys0, faults0) = time.monotonic(), time.perf_counter(), cpu_times()
        try:
            result = await node.all_reduce(cmd["run"], target, cmd.get("op", "avg"),
                                           tag=cmd.get("tag", "default"),
                                           quant=Quant(cmd.get("quant", 0)),
                                           retry=cmd.get("retry", True), out=into)
        except PeerLost as exc:
            return {"event": "error", "kind": type(exc).__name__, "message": str(exc),
                    "peers": list(exc.peers), "input_intact": await _intact(data, original)}
        seconds, ended, (user1, sys1, faults1) = (time.perf_counter() - t0, time.monotonic(),
                                                  cpu_times())
        peak = max(0, rss_peak() - rss_before)
        got = data if dest is None else dest
        out = cmd.get("out")

        async def checks() -> dict[str, Any]:
            # A pass or two over the tensor each (sha256 of 40 MB: ~25 ms of CPU).
            kept = None if dest is None else await _intact(data, original)
            if out:
                await trio.to_thread.run_sync(np.save, Path(out) / f"r{rnd}_{index}.npy", got)
            return {"sha256": await trio.to_thread.run_sync(digest, got), "input_intact": kept}

        if cmd.get("checks") == "later":
            # Run by a "checks" command once every peer is done: made here,
            # they would take CPU from the peers still in their timed call.
            finished.clear()
            finished[rnd] = checks
            fields = {}
        else:
            fields = await checks()
        return {"event": "result", "round": rnd, "participants": list(result.participants),
                "revision": result.revision, "seconds": seconds,
                "cpu_seconds": user1 - user0 + sys1 - sys0, "cpu_user": user1 - user0,
                "cpu_system": sys1 - sys0, "page_faults": faults1 - faults0,
                "bytes_sent": result.bytes_sent,
                "attempts": result.attempts, "peak_extra_bytes": peak,
                "phases": dict(result.phases),
                "monotonic_start": started, "monotonic_end": ended, **fields}
    if kind == "checks":
        check = finished.pop(cmd["round"], None)
        if check is None:
            raise PeerdError(f"no finished all-reduce of round {cmd['round']} to check")
        return {"event": "checked", "round": cmd["round"], **await check()}
    if kind in _NAT_COMMANDS:
        return await _nat_command(node, kind, cmd)
    if kind == "node_stats":
        import dataclasses

        return {"event": "node_stats", **dataclasses.asdict(node.statistics())}
    if kind == "tune":
        return _tune(node, cmd)
    if kind == "stats":
        return {"event": "stats", "engine": repr(node.engine(cmd["run"]).statistics())}
    raise PeerdError(f"unknown command {kind!r}")


def _tune(node: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """Benchmarks compare data-path knobs round by round on one swarm (the
    machine's state drifts more between swarms than the knobs matter)."""
    import dataclasses

    from collectives import allreduce
    from peerd import datapump

    if "switch_interval" in cmd:
        sys.setswitchinterval(float(cmd["switch_interval"]))
    if "native" in cmd:
        datapump.enable(bool(cmd["native"]))
    for name in ("SEND_AHEAD", "RECEIVE_AHEAD", "THREAD_MIN", "COMMIT_THREADS"):
        if name.lower() in cmd:
            setattr(allreduce, name, int(cmd[name.lower()]))
    if "sub_chunk_bytes" in cmd:
        engine = node.engine(cmd["run"])
        engine.config = dataclasses.replace(engine.config,
                                            sub_chunk_bytes=int(cmd["sub_chunk_bytes"]))
    return {"event": "tuned"}


_NAT_COMMANDS = ("connect_peer", "disconnect", "path", "relay_to", "try_upgrade", "data_send",
                 "data_recv")


async def _nat_command(node: Any, kind: str, cmd: dict[str, Any]) -> dict[str, Any]:
    """Commands of the NAT lab: reach a peer by id, report paths, move data."""
    import trio

    from peerd.identity import PeerId

    peer = PeerId.parse(cmd["peer"])
    t0 = time.perf_counter()
    if kind == "connect_peer":
        await node.connect_peer(peer, timeout=cmd.get("timeout", 60.0))
    elif kind == "disconnect":
        node.disconnect(peer)
        await trio.sleep(0.2)  # let the close reach the peer before the next command
    elif kind == "relay_to":
        await node.traversal.relay_to(peer, PeerId.parse(cmd["relay"]))
    elif kind == "try_upgrade":
        await node.traversal.try_upgrade(peer)
    elif kind == "data_send":
        before = dict(node.data.routes_used)
        data = np.random.default_rng(cmd["seed"]).integers(0, 255, cmd["size"], dtype=np.uint8)
        t0 = time.perf_counter()
        link = await node.open_data_channels(peer, cmd.get("channels"), cmd["purpose"])
        opened = time.perf_counter() - t0
        t1 = time.perf_counter()
        await link.send(b"lab", data)
        route = [r for r, n in node.data.routes_used.items() if n > before.get(r, 0)]
        return {"event": "sent", "sha256": digest(data), "open_seconds": opened,
                "seconds": time.perf_counter() - t1, "route": route[0] if route else "?",
                "path": node.peer_path(peer)}
    elif kind == "data_recv":
        link = await node.accept_data_channels(peer, cmd["purpose"])
        got = await link.receive(b"lab")
        return {"event": "received", "sha256": digest(np.frombuffer(got, dtype=np.uint8)),
                "bytes": len(got)}
    return {"event": kind, "path": node.peer_path(peer), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- the driver


class PeerProcess:
    """One ``peerd.peerproc`` child, driven over its stdin/stdout."""

    def __init__(self, key_hex: str, index: int, env: dict[str, str] | None = None,
                 listen: str = "127.0.0.1:0", prefix: list[str] | None = None) -> None:
        """``prefix`` wraps the command, e.g. ``["ip", "netns", "exec", NS]``."""
        self.index = index
        # stderr goes to a file so a crash can be explained in the error it causes.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "peerd.peerproc", key_hex, str(index),
             listen],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, **(env or {})}, text=True, bufsize=1,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.expect("ready", timeout=READY_TIMEOUT)
        self.peer: str = ready["peer"]
        self.addr: str = ready["addr"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue  # stray output (warnings) is not part of the protocol
        self._lines.put(None)

    def stderr_tail(self, limit: int = 3000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            # Gone before the command: say why, as ``expect`` does.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            raise EOFError(f"peer {self.index} exited (code {self.proc.poll()}) before "
                           f"{cmd.get('cmd')!r}: {self.stderr_tail()}") from None

    def expect(self, *events: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next event line; raises if it is not one of ``events`` or the
        process ended."""
        try:
            msg = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"peer {self.index}: no answer within {timeout}s") from None
        if msg is None:
            raise EOFError(f"peer {self.index} exited (code {self.proc.poll()}): "
                           f"{self.stderr_tail()}")
        if events and msg.get("event") not in events:
            raise AssertionError(f"peer {self.index}: expected {events}, got {msg}")
        return msg

    def request(self, timeout: float = 120.0, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.expect(timeout=timeout)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Ask politely, then SIGKILL by pid; always reaps the child."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                self.send(cmd="quit")
                self.proc.wait(timeout=5)
            except (OSError, EOFError, subprocess.TimeoutExpired, ValueError):
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class LocalSwarm:
    """N peer processes, fully connected, members of one run.

    ``factory(key_hex, index)`` starts one peer; by default on loopback (a
    network-namespace lab passes one that runs it inside a namespace).
    """

    def __init__(self, n: int, run: str = "run", key_hex: str | None = None,
                 factory: Callable[[str, int], PeerProcess] | None = None,
                 env: dict[str, str] | None = None) -> None:
        """``env`` is added to the environment of peers the default factory starts."""
        self.key_hex = key_hex or os.urandom(32).hex()
        self.run = run
        self.peers: list[PeerProcess] = []
        self._factory = factory or (lambda key, i: PeerProcess(key, i, env=env))
        try:
            for i in range(n):
                self.peers.append(self._factory(self.key_hex, i))
            for i, p in enumerate(self.peers):
                for q in self.peers[:i]:
                    p.request(cmd="connect", addr=q.addr)
            members = [p.peer for p in self.peers]
            for p in self.peers:
                p.send(cmd="join", run=run, members=members)
            for p in self.peers:
                p.expect("joined")
        except BaseException:
            self.close()
            raise

    def add_peer(self) -> PeerProcess:
        """A new process connected to every live peer (it has not joined yet)."""
        p = self._factory(self.key_hex, len(self.peers))
        self.peers.append(p)
        for q in self.peers[:-1]:
            if q.alive():
                p.request(cmd="connect", addr=q.addr)
        return p

    def by_peer(self, peer_id: str) -> PeerProcess:
        return next(p for p in self.peers if p.peer == peer_id)

    def all_reduce(self, peers: list[PeerProcess], timeout: float = 120.0,
                   **cmd: Any) -> list[dict[str, Any]]:
        """Run one all-reduce on ``peers``; they start it together, after each
        has made its input (a barrier through this driver). With ``start_in``
        (seconds) each peer waits until that long after the commands go out,
        so their timers start at the same instant."""
        start_in = cmd.pop("start_in", None)
        for p in peers:
            p.send(cmd="prepare", **cmd)
        for p in peers:
            p.expect("prepared", timeout=timeout)
        if start_in is not None:
            cmd["start_at"] = time.monotonic() + start_in
        for p in peers:
            p.send(cmd="allreduce", run=self.run, checks="later", **cmd)
        results = [p.expect("result", "error", timeout=timeout) for p in peers]
        # The result's checks (digest, input intact) once every peer is done.
        done = [(p, r) for p, r in zip(peers, results, strict=True) if r["event"] == "result"]
        for p, _ in done:
            p.send(cmd="checks", round=cmd["round"])
        for p, r in done:
            checked = p.expect("checked", timeout=timeout)
            r.update(sha256=checked["sha256"], input_intact=checked["input_intact"])
        return results

    def reference(self, participants: list[str], seed: int, round_: int, size: int,
                  op: str = "avg") -> np.ndarray:
        stack = np.stack([make_input(seed, self.by_peer(q).index, round_, size, "float32")
                          .astype(np.float64) for q in participants])
        return stack.mean(axis=0) if op == "avg" else stack.sum(axis=0)

    def close(self) -> None:
        for p in self.peers:
            p.stop()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    import trio

    listen_at = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1:0"
    trio.run(_peer_main, sys.argv[1], int(sys.argv[2]), listen_at)
