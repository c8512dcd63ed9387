from __future__ import annotations

import pytest
import trio
import trio.testing

from collectives.fabric import Fabric
from collectives.memfabric import MemNetwork
from peerd.errors import PeerLost, RemoteError, Timeout


async def echo(peer: str, payload: bytes) -> bytes:
    return peer.encode() + b":" + payload


def net3() -> tuple[MemNetwork, dict[str, Fabric]]:
    net = MemNetwork()
    fabrics = {p: net.add(p) for p in ("a", "b", "c")}
    for f in fabrics.values():
        f.register("echo", echo)
    return net, fabrics  # type: ignore[return-value]


async def test_is_a_fabric_and_calls_handlers() -> None:
    _net, f = net3()
    assert isinstance(f["a"], Fabric)
    assert await f["a"].call("b", "echo", b"hi", 1.0) == b"a:hi"
    assert f["a"].peers() == {"b", "c"}
    with pytest.raises(RemoteError):
        await f["a"].call("b", "nope", b"", 1.0)
    with pytest.raises(ValueError):
        f["a"].register("echo", echo)


async def test_data_is_copied_and_matched_by_key() -> None:
    net, f = net3()
    buf = bytearray(b"xyz")
    await f["a"].send_data("b", b"k1", memoryview(buf))
    buf[0] = ord("Q")
    await f["a"].send_data("b", b"k2", b"second")
    assert await f["b"].recv_data("a", b"k2") == b"second"
    assert await f["b"].recv_data("a", b"k1") == b"xyz"
    assert net.bytes_sent[("a", "b")] == 9
    await f["a"].send_data("b", b"old/1", b"x")
    f["b"].drop_data(b"old/")
    assert net.pending_data() == 0


async def test_kill_wakes_pending_receive_and_call(mock_clock: trio.testing.MockClock) -> None:
    net, f = net3()
    blocked = trio.Event()

    async def slow(peer: str, payload: bytes) -> bytes:
        blocked.set()
        await trio.sleep_forever()
        return b""

    f["c"].register("slow", slow)
    errors: list[BaseException] = []

    async def catch(fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            await fn(*args)
        except PeerLost as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(catch, f["a"].recv_data, "c", b"never")
        n.start_soon(catch, f["b"].call, "c", "slow", b"", 100.0)
        await blocked.wait()
        net.kill("c")
    assert len(errors) == 2 and all(e.peers == ("c",) for e in errors)
    assert "c" not in f["a"].peers()
    with pytest.raises(PeerLost):
        await f["a"].send_data("c", b"k", b"x")


async def test_stall_times_calls_out_and_holds_data(mock_clock: trio.testing.MockClock) -> None:
    net, f = net3()
    net.stall("b")
    start = trio.current_time()
    with pytest.raises(Timeout):
        await f["a"].call("b", "echo", b"", 3.0)
    assert trio.current_time() - start == pytest.approx(3.0)
    got: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(f["a"].send_data, "b", b"k", b"late")

        async def receive() -> None:
            got.append(await f["b"].recv_data("a", b"k"))

        n.start_soon(receive)
        await trio.sleep(10)
        assert got == []
        net.resume("b")
    assert got == [b"late"]


async def test_cut_breaks_one_link_only(mock_clock: trio.testing.MockClock) -> None:
    net, f = net3()
    net.cut("a", "b")
    with pytest.raises(PeerLost):
        await f["a"].call("b", "echo", b"", 1.0)
    assert await f["a"].call("c", "echo", b"", 1.0) == b"a:"
    net.heal("a", "b")
    assert await f["a"].call("b", "echo", b"", 1.0) == b"a:"


async def test_latency_and_bandwidth(mock_clock: trio.testing.MockClock) -> None:
    net, f = net3()
    net.set_link("a", "b", latency=0.1, bandwidth=1000.0)
    start = trio.current_time()
    await f["a"].send_data("b", b"k", bytes(500))
    assert trio.current_time() - start == pytest.approx(0.6)
    start = trio.current_time()
    await f["a"].call("b", "echo", b"", 5.0)
    assert trio.current_time() - start == pytest.approx(0.2 + 2 / 1000.0)  # reply "a:"
