"""Receiving end of benchmarks/transport.py in its own process.

argv: plain|secure CONNS COUNT SECRET_HEX TOKEN_HEX,... ; prints ``port N``,
then, once COUNT messages of the benchmark size arrived on one link,
``done CPU_SECONDS`` (CPU of this process) and waits to be killed.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

# Run as a script, this folder is sys.path[0], and benchmarks/crdt.py, nat.py
# would shadow the packages of the same name: take the folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import trio

from peerd import aead
from peerd.datachan import DataConfig, DataListener
from peerd.datalink import LinkConfig, open_data_link
from peerd.dataproto import TokenTable
from peerd.datastream import DataChannel, SocketTransport, tune_socket
from peerd.record import Keying

MESSAGE = 64 * 1024 * 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(mode: str, conns: int, count: int, secret: bytes, tokens: list[bytes],
               record: int, sockbuf: int) -> None:
    cfg = DataConfig(max_record=record, socket_buffer=sockbuf)
    chans: list[DataChannel] = []
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        if mode == "secure":
            table = TokenTable(entropy=_fixed(tokens))
            for _ in tokens:
                # The dialler picks the same: both run this install's first cipher.
                table.issue("B", Keying(secret, aead.supported()[0]), 300.0,
                            trio.current_time())

            def on_channel(peer: str, chan: DataChannel) -> None:
                chans.append(chan)
                if len(chans) == conns:
                    ready.set()

            port = await nursery.start(DataListener(table, on_channel, config=cfg).serve)
            print(f"port {port}", flush=True)
            await ready.wait()
        else:
            lsock = trio.socket.socket()
            tune_socket(lsock, sockbuf, cfg.congestion, cfg.notsent_lowat)
            await lsock.bind(("127.0.0.1", 0))
            lsock.listen(conns)
            print(f"port {lsock.getsockname()[1]}", flush=True)
            for _ in range(conns):
                c, _ = await lsock.accept()
                chans.append(DataChannel(SocketTransport(c), None, None, "B", max_record=record))
            lsock.close()
        out = bytearray(MESSAGE)
        cpu = _cpu()
        async with open_data_link("B", chans, LinkConfig()) as rx:
            for i in range(count):
                await rx.receive_into(b"m%d" % i, out)
            print(f"done {_cpu() - cpu}", flush=True)
            await trio.sleep_forever()  # the parent kills us (by pid) when it has read "done"


def _fixed(tokens: list[bytes]):  # type: ignore[no-untyped-def]
    it = iter(tokens)
    return lambda n: next(it)


if __name__ == "__main__":
    mode, conns, count, secret, toks, record, sockbuf = sys.argv[1:8]
    trio.run(main, mode, int(conns), int(count), bytes.fromhex(secret),
             [bytes.fromhex(t) for t in toks.split(",") if t], int(record), int(sockbuf))
