"""Data-plane throughput on loopback: encrypted DataLink vs plain TCP vs raw record crypto.

One run measures, on 127.0.0.1, first with sender and receiver in one trio
process (every byte pays both ends' costs on one core), then with the
receiver in its own process as a real peer is (the headline figure):

* the encrypted ``DataLink`` (token preamble, key confirmation, AEGIS-256
  records) with 1, 2 and 4 TCP connections;
* plain TCP through the very same ``DataLink``/``DataChannel`` code with the
  same connection counts and socket buffers, minus the crypto (plaintext
  channels, a benchmark-only mode);
* raw record seal + open (the install's first cipher) on the same record sizes (one core);
* QUIC streams: see ``measure_quic_stream`` (hook for the control plane).

The last line is ``ratio encrypted/plain TCP (4 conns): X.XX``.
Usage: ``python benchmarks/transport.py [--mib-per-conn-count 1024] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], and benchmarks/crdt.py, nat.py
# would shadow the packages of the same name: take the folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio

from peerd import aead
from peerd.aead import KEY_SIZE
from peerd.datachan import DataConfig, DataListener, dial_data_channel
from peerd.datalink import LinkConfig, open_data_link
from peerd.dataproto import TOKEN_SIZE, TokenTable
from peerd.datastream import DataChannel, SocketTransport
from peerd.record import Keying, RecordOpener, RecordSealer, record_size

MESSAGE = 64 * 1024 * 1024


async def _plain_channels(n: int, cfg: DataConfig) -> tuple[list[DataChannel], list[DataChannel]]:
    """n connected plaintext channel pairs, tuned exactly like the real ones."""
    lsock = trio.socket.socket()
    cfg.tune(lsock)
    await lsock.bind(("127.0.0.1", 0))
    lsock.listen(n)
    port = lsock.getsockname()[1]
    a: list[DataChannel] = []
    b: list[DataChannel] = []
    for _ in range(n):
        s = trio.socket.socket()
        cfg.tune(s)
        await s.connect(("127.0.0.1", port))
        c, _ = await lsock.accept()
        a.append(DataChannel(SocketTransport(s), None, None, "B", max_record=cfg.max_record))
        b.append(DataChannel(SocketTransport(c), None, None, "A", max_record=cfg.max_record))
    lsock.close()
    return a, b


async def _secure_channels(
    n: int, cfg: DataConfig, nursery: trio.Nursery
) -> tuple[list[DataChannel], list[DataChannel]]:
    keying = Keying(os.urandom(32), aead.supported()[0])
    table = TokenTable()
    accepted: list[DataChannel] = []
    ready = trio.Event()

    def on_channel(peer: str, chan: DataChannel) -> None:
        accepted.append(chan)
        if len(accepted) == n:
            ready.set()

    listener = DataListener(table, on_channel, config=cfg)
    port = await nursery.start(listener.serve)
    dialed = []
    for _ in range(n):
        token = table.issue("A", keying, 30.0, trio.current_time())
        dialed.append(await dial_data_channel("127.0.0.1", port, token, keying, "B", cfg))
    await ready.wait()
    return dialed, accepted


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


async def _measure_link(
    tx_chans: list[DataChannel], rx_chans: list[DataChannel], total: int, link_cfg: LinkConfig
) -> tuple[float, float]:
    """(Gbit/s, CPU seconds per GiB) of ``total`` bytes sent as 64 MiB
    messages and received in place."""
    payload = bytearray(os.urandom(1024)) * (MESSAGE // 1024)
    out = bytearray(MESSAGE)
    count = max(1, total // MESSAGE)
    async with open_data_link("B", tx_chans, link_cfg) as tx, \
            open_data_link("A", rx_chans, link_cfg) as rx:

        async def sender() -> None:
            for i in range(count):
                await tx.send(b"m%d" % i, payload)

        async def receiver() -> None:
            for i in range(count):
                await rx.receive_into(b"m%d" % i, out)

        start, cpu = time.perf_counter(), _cpu()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
        elapsed, cpu = time.perf_counter() - start, _cpu() - cpu
    if out != payload:
        raise SystemExit("payload corrupted in transit")
    return count * MESSAGE * 8 / elapsed / 1e9, cpu / (count * MESSAGE / 2**30)


async def measure_tcp(conns: int, secure: bool, total: int, cfg: DataConfig,
                      link_cfg: LinkConfig) -> tuple[float, float, tuple[int, int]]:
    async with trio.open_nursery() as nursery:
        if secure:
            a, b = await _secure_channels(conns, cfg, nursery)
        else:
            a, b = await _plain_channels(conns, cfg)
        granted = (a[0].statistics().sndbuf, a[0].statistics().rcvbuf)
        rate, cpu = await _measure_link(a, b, total, link_cfg)
        nursery.cancel_scope.cancel()
    return rate, cpu, granted


def measure_crypto(record: int, total: int) -> float:
    """Gbit/s of seal + open of ``record``-byte records on one core."""
    key, cipher = os.urandom(KEY_SIZE), aead.supported()[0]
    sealer = RecordSealer(key, record, cipher=cipher)
    opener = RecordOpener(key, record, cipher=cipher)
    plain = memoryview(bytearray(os.urandom(record)))
    wire = memoryview(bytearray(record_size(record)))
    back = memoryview(bytearray(record))
    reps = max(1, total // record)
    start = time.perf_counter()
    for _ in range(reps):
        sealer.seal_into(3, plain, wire)
        kind, _ = opener.parse_header(wire[:5])
        opener.open_into(kind, wire[5:], back)
    return reps * record * 8 / (time.perf_counter() - start) / 1e9


async def measure_quic_stream(total: int) -> float | None:
    """QUIC-STREAM HOOK: Gbit/s of bulk bytes between two in-process nodes over
    their authenticated QUIC session (1 MiB RPC payloads, several in flight),
    i.e. what the data plane's QUIC fallback would carry. Returns None if the
    node layer is not importable. The control-plane engineer may refine it."""
    try:
        from peerd.identity import PeerId, SwarmKey
        from peerd.node import open_node
    except ImportError:
        return None
    chunk = os.urandom(1024 * 1024)
    count = max(1, total // len(chunk))
    received = 0

    async def sink(peer: PeerId, payload: bytes) -> bytes:
        nonlocal received
        received += len(payload)
        return b""

    key = SwarmKey(os.urandom(32))
    async with open_node(key) as a, open_node(key) as b:
        b.register("bench.sink", sink)
        await a.connect(b.listen_address)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for lane in range(4):
                async def run(lane: int = lane) -> None:
                    for _ in range(lane, count, 4):
                        await a.call(b.peer_id, "bench.sink", chunk, timeout=120.0)
                nursery.start_soon(run)
        elapsed = time.perf_counter() - start
    return received * 8 / elapsed / 1e9


async def measure_two_process(conns: int, secure: bool, total: int,
                              cfg: DataConfig) -> tuple[float, float]:
    """Like ``measure_tcp`` but the receiver is another process, as a real peer
    is: each end pays only its own costs (one crypto pass each), on its own core.
    Returns (Gbit/s, CPU seconds per GiB of both processes)."""
    import subprocess

    count = max(1, total // MESSAGE)
    secret = os.urandom(32)
    tokens = [os.urandom(TOKEN_SIZE) for _ in range(conns)] if secure else []
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_transport_rx.py")),
         "secure" if secure else "plain", str(conns), str(count), secret.hex(),
         ",".join(t.hex() for t in tokens), str(cfg.max_record), str(cfg.socket_buffer)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().split()[1])
        if secure:
            keying = Keying(secret, aead.supported()[0])
            chans = [await dial_data_channel("127.0.0.1", port, t, keying, "B", cfg)
                     for t in tokens]
        else:
            chans = []
            for _ in range(conns):
                s = trio.socket.socket()
                cfg.tune(s)
                await s.connect(("127.0.0.1", port))
                chans.append(DataChannel(SocketTransport(s), None, None, "A",
                                         max_record=cfg.max_record))
        payload = bytearray(os.urandom(1024)) * (MESSAGE // 1024)
        async with open_data_link("A", chans, LinkConfig()) as tx:
            start, cpu = time.perf_counter(), _cpu()
            for i in range(count):
                await tx.send(b"m%d" % i, payload)
            line = await trio.to_thread.run_sync(child.stdout.readline)
            elapsed, cpu = time.perf_counter() - start, _cpu() - cpu
            child.kill()
        child_cpu = float(line.split()[1])
    finally:
        child.kill()
        child.wait()
    return count * MESSAGE * 8 / elapsed / 1e9, (cpu + child_cpu) / (count * MESSAGE / 2**30)


async def main(args: argparse.Namespace) -> None:
    total = args.mib * 1024 * 1024
    cfg = DataConfig(max_record=args.record_kib * 1024, socket_buffer=args.sockbuf_mib << 20)
    link_cfg = LinkConfig()
    print(f"loopback, {total >> 20} MiB per measurement in {MESSAGE >> 20} MiB messages, "
          f"records {args.record_kib} KiB, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}")
    aes = max(measure_crypto(cfg.max_record, min(total, 512 << 20)) for _ in range(args.repeat))
    print(f"raw {aead.supported()[0]} record seal+open, one core: {aes:6.2f} Gbit/s")
    results: dict[tuple[int, bool], float] = {}
    cpus: dict[tuple[int, bool], float] = {}
    for conns in (1, 2, 4):
        for secure in (False, True):
            best, best_cpu = 0.0, 0.0
            for _ in range(args.repeat):
                rate, cpu, granted = await measure_tcp(conns, secure, total, cfg, link_cfg)
                if rate > best:
                    best, best_cpu = rate, cpu
            results[(conns, secure)] = best
            cpus[(conns, secure)] = best_cpu
            name = "encrypted DataLink" if secure else "plain TCP         "
            print(f"{name} {conns} conn(s): {best:6.2f} Gbit/s, {best_cpu:.2f} CPU-s/GiB "
                  f"(SO_SNDBUF/SO_RCVBUF granted {granted[0]}/{granted[1]})")
    threaded = DataConfig(max_record=cfg.max_record, socket_buffer=cfg.socket_buffer,
                          crypto_threads=True)
    rate, cpu, _ = await measure_tcp(4, True, total, threaded, link_cfg)
    print(f"encrypted DataLink 4 conn(s), crypto on worker threads: {rate:6.2f} Gbit/s, "
          f"{cpu:.2f} CPU-s/GiB (opt-in; the default is inline)")
    two: dict[tuple[int, bool], float] = {}
    for conns in (1, 4):
        for secure in (False, True):
            best = 0.0
            for _ in range(args.repeat):
                rate, cpu = await measure_two_process(conns, secure, total, cfg)
                best = max(best, rate)
            two[(conns, secure)] = best
            name = "encrypted DataLink" if secure else "plain TCP         "
            print(f"{name} {conns} conn(s), receiver in its own process: {best:6.2f} Gbit/s")
    quic = await measure_quic_stream(min(total, 16 << 20))
    print("QUIC stream: " + ("not measured (hook in measure_quic_stream)" if quic is None
                             else f"{quic:6.2f} Gbit/s"))
    # Throughput on a shared machine swings with other load; CPU seconds per
    # byte (both ends, all threads) do not, so print that ratio as well.
    print(f"CPU cost ratio plain/encrypted (4 conns): {cpus[(4, False)] / cpus[(4, True)]:.2f}")
    for conns in (1, 2):
        ratio = results[(conns, True)] / results[(conns, False)]
        print(f"ratio encrypted/plain TCP ({conns} conns): {ratio:.2f}")
    print(f"ratio encrypted/plain TCP (4 conns, both ends in one process): "
          f"{results[(4, True)] / results[(4, False)]:.2f}")
    print(f"ratio encrypted/plain TCP (1 conn, one process per end): "
          f"{two[(1, True)] / two[(1, False)]:.2f}")
    # Headline: one process per end, as between real peers.
    print(f"ratio encrypted/plain TCP (4 conns): {two[(4, True)] / two[(4, False)]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB per measurement")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure (best kept)")
    parser.add_argument("--record-kib", type=int, default=1024)
    parser.add_argument("--sockbuf-mib", type=int, default=8)
    trio.run(main, parser.parse_args())
