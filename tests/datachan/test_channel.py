"""DataChannel and DataListener over real loopback sockets."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing

from peerd import datachan, datapump
from peerd.datachan import (
    CRYPTO_THREAD_CORES,
    DATA_HANDSHAKE_TIMEOUT,
    DataConfig,
    dial_data_channel,
)
from peerd.dataproto import MAGIC, PREAMBLE_SIZE, TOKEN_SIZE, Kind, encode_head, encode_preamble
from peerd.datastream import DataChannel
from peerd.errors import AuthError, PeerLost, ProtocolError
from peerd.record import TAG_SIZE, Keying
from peerd.writegate import WriteGate

from .conftest import open_rig

pytestmark = pytest.mark.usefixtures("record_loops")


async def test_messages_roundtrip_and_statistics() -> None:
    async with open_rig(DataConfig(max_record=4096)) as rig:
        a, b = await rig.pair()
        payload = os.urandom(50_000)  # 13 records
        await a.send(b"first", payload)
        await a.send(b"", b"")
        await b.send(b"back", memoryview(payload)[:10])
        assert await b.receive() == (b"first", bytearray(payload))
        assert await b.receive() == (b"", bytearray())
        assert await a.receive() == (b"back", bytearray(payload[:10]))
        sa, sb = a.statistics(), b.statistics()
        assert sa.messages_sent == 2 and sb.messages_received == 2
        assert sa.records_sent == sb.records_received == 1 + 13 + 1  # heads + 4 KiB records
        assert sa.sndbuf > 0 and sb.rcvbuf > 0
        assert a.token == b.token and len(a.token) == TOKEN_SIZE


async def test_channels_run_the_record_loops_and_cipher_asked_for(record_loops: str) -> None:
    async with open_rig() as rig:
        a, b = await rig.pair()
        assert a.native == b.native == (record_loops == "native")
        assert a.cipher == b.cipher == rig.keying.cipher == os.environ["PEERD_CIPHERS"]
        assert DataChannel(a._t, None, None, "p", native=True).native is False  # plaintext


async def test_numpy_payload_without_copy_semantics() -> None:
    np = pytest.importorskip("numpy")
    async with open_rig() as rig:
        a, b = await rig.pair()
        arr = np.arange(300_000, dtype=np.float32).reshape(600, 500)
        await a.send(b"t", arr)
        _, got = await b.receive()
        assert np.array_equal(np.frombuffer(got, np.float32).reshape(600, 500), arr)
        with pytest.raises(ValueError):
            await a.send(b"t", arr[:, ::2])  # not contiguous


async def test_close_is_reported_as_peer_lost() -> None:
    async with open_rig() as rig:
        a, b = await rig.pair()
        await a.aclose()
        with pytest.raises(PeerLost, match="closed by peer"):
            await b.receive()
        a2, b2 = await rig.pair()
        a2.abort()  # no CLOSE record: looks like a crash or a truncation
        with pytest.raises(PeerLost):
            await b2.receive()


async def _raw(port: int, data: bytes, close: bool = True) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    if data:
        await sock.send(data)
    if close:
        sock.close()
    return sock


async def _wait_for(cond: Callable[[], bool], what: str) -> None:
    """Poll another task's counter (the listener exposes no event), bounded in time."""
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.01)


async def test_garbage_and_bad_tokens_leave_listener_serving() -> None:
    async with open_rig() as rig:
        st = rig.listener.statistics
        for junk in (b"", os.urandom(7), os.urandom(PREAMBLE_SIZE), b"\0" * 100_000,
                     MAGIC + b"\x09" + b"x" * TOKEN_SIZE):
            await _raw(rig.port, junk)
        await _wait_for(lambda: st().bad_preamble + st().aborted >= 5, "garbage counted")
        # Unknown token: the dialer is refused.
        with pytest.raises(AuthError):
            await dial_data_channel("127.0.0.1", rig.port, os.urandom(TOKEN_SIZE), rig.keying, "x")
        # Reused token: the first use works, the second is refused.
        tok = rig.token()
        first = await dial_data_channel("127.0.0.1", rig.port, tok, rig.keying, "listener")
        rig.opened.append(first)
        await rig.accepted.receive()
        with pytest.raises(AuthError):
            await dial_data_channel("127.0.0.1", rig.port, tok, rig.keying, "listener")
        # Right token, wrong secret: the listener's confirmation does not authenticate.
        with pytest.raises(AuthError):
            wrong = Keying(os.urandom(32), rig.keying.cipher)
            await dial_data_channel("127.0.0.1", rig.port, rig.token(), wrong, "x")
        # Valid preamble, then an oversized record length instead of a confirmation.
        await _raw(rig.port, encode_preamble(rig.token()) + struct.pack(">BI", 1, 2**32 - 1))
        await _wait_for(lambda: st().bad_token >= 2 and st().bad_confirm >= 2, "counted")
        a, b = await rig.pair()
        await a.send(b"ok", b"still serving")
        assert await b.receive() == (b"ok", bytearray(b"still serving"))
        assert st().accepted == 2 and st().pending == 0


async def test_pending_cap_refuses_extra_strangers() -> None:
    async with open_rig(max_pending=2) as rig:
        st = rig.listener.statistics
        idle = [await _raw(rig.port, b"", close=False) for _ in range(2)]
        await _wait_for(lambda: st().pending == 2, "two pending")
        extra = await _raw(rig.port, b"", close=False)
        await _wait_for(lambda: st().refused_busy == 1, "third refused")
        with trio.fail_after(5):
            assert await extra.recv(10) == b""  # closed by the listener at once
        for s in [*idle, extra]:
            s.close()
        await _wait_for(lambda: st().pending == 0, "stalled ones gone")
        a, b = await rig.pair()
        await b.send(b"h", b"p")
        assert await a.receive() == (b"h", bytearray(b"p"))


async def test_half_open_handshake_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with open_rig() as rig:
        st = rig.listener.statistics
        sock = await _raw(rig.port, encode_preamble(rig.token())[:20], close=False)
        start = trio.current_time()
        with trio.fail_after(DATA_HANDSHAKE_TIMEOUT * 2):
            assert await sock.recv(10) == b""  # listener gave up on us
        assert trio.current_time() - start >= DATA_HANDSHAKE_TIMEOUT - 0.01
        assert st().timeouts == 1
        sock.close()


async def test_tampered_record_is_protocol_error() -> None:
    async with open_rig() as rig:
        a, b = await rig.pair()
        # Write a well-formed header with a forged body straight onto a's socket.
        forged = struct.pack(">BI", 2, 16 + 20) + os.urandom(36)
        await a._t.send_all(forged)
        with pytest.raises(ProtocolError):
            await b.receive()


async def test_cancel_mid_message_aborts_but_clean_boundary_does_not() -> None:
    async with open_rig() as rig:
        a, b = await rig.pair()
        with trio.move_on_after(0.01):
            await b.receive()  # nothing sent: cancelled at a message boundary
        await a.send(b"h", b"x" * 100_000)
        assert await b.receive_head() == (b"h", 100_000)
        with trio.CancelScope() as scope:
            scope.cancel()
            await b.next_payload_record()  # cancelled inside a message
        with pytest.raises(PeerLost):
            await b.receive()


async def test_rekey_over_a_real_connection() -> None:
    async with open_rig(DataConfig(max_record=1024, rekey_interval=7)) as rig:
        a, b = await rig.pair()
        payload = os.urandom(40_000)  # 40 records: several key changes each way
        await a.send(b"r", payload)
        assert await b.receive() == (b"r", bytearray(payload))
        sa, sb = a.statistics(), b.statistics()
        assert sa.rekeys_sent == sb.rekeys_received >= 5
        assert sa.records_sent == sb.records_received == 1 + 40  # counted across key changes
        assert sa.bytes_sent == sb.bytes_received


async def test_records_sealed_and_opened_on_worker_threads() -> None:
    # Records of at least OFFLOAD_MIN go to worker threads; smaller ones stay inline.
    async with open_rig(DataConfig(crypto_threads=True)) as rig:
        a, b = await rig.pair()
        big = os.urandom(3 * 1024 * 1024 + 77)  # three 1 MiB records and a short one
        await a.send(b"big", big)
        await a.send(b"small", b"tiny")
        assert await b.receive() == (b"big", bytearray(big))
        assert await b.receive() == (b"small", bytearray(b"tiny"))
        await b.send(b"h", big)  # and back, received record by record in place
        head, n = await a.receive_head()
        out = bytearray(n)
        view, off = memoryview(out), 0
        while off < n:
            k = await a.next_payload_record()
            await a.read_payload_into(view[off : off + k])
            off += k
        assert (head, out) == (b"h", bytearray(big))


async def test_forged_large_record_is_refused_on_a_worker_thread() -> None:
    size = 1 << 20
    async with open_rig(DataConfig(crypto_threads=True)) as rig:
        a, b = await rig.pair()
        assert a._sealer is not None
        await a._t.send_all(a._sealer.seal(Kind.HEAD, encode_head(b"h", size)))
        forged = struct.pack(">BI", Kind.PAYLOAD, size + TAG_SIZE) + os.urandom(size + TAG_SIZE)
        await a._t.send_all(forged)
        assert await b.receive_head() == (b"h", size)
        n = await b.next_payload_record()
        with pytest.raises(ProtocolError):
            await b.read_payload_into(memoryview(bytearray(n)))


@pytest.mark.parametrize(("cores", "native", "setting", "offload"), [
    # Unset: threads only for the Python record loops, and only with cores to spare.
    (2, False, None, False), (CRYPTO_THREAD_CORES, False, None, True),
    (CRYPTO_THREAD_CORES, True, None, False), (64, True, None, False),
    # Set: as set, whatever the cores and loops.
    (64, False, False, False), (1, True, True, True), (64, True, True, True),
])
def test_crypto_threads_follow_the_loops_and_cores_unless_set(
    monkeypatch: pytest.MonkeyPatch, cores: int, native: bool, setting: bool | None,
    offload: bool,
) -> None:
    monkeypatch.setattr(datachan, "usable_cores", lambda: cores)
    monkeypatch.setattr(datapump, "_enabled", native)
    assert DataConfig(crypto_threads=setting).offload() is offload


# ------------------------------------------------------------ payloads on I/O threads

RECORD = 64 * 1024  # OFFLOAD_MIN: a payload of four records goes to an I/O thread


async def _stalled_payload(
    a: DataChannel, b: DataChannel, records: list[bytes], total: int
) -> None:
    """``a`` announces a ``total``-byte message and sends only ``records``;
    ``b`` has read its head."""
    assert a._sealer is not None
    await a._t.send_all(a._sealer.seal(Kind.HEAD, encode_head(b"h", total)))
    for rec in records:
        await a._t.send_all(a._sealer.seal(Kind.PAYLOAD, rec))
    assert await b.receive_head() == (b"h", total)


async def _until(check: Callable[[], bool]) -> None:
    # The writer is an OS thread: there is no trio event to wait on.
    with trio.fail_after(5):
        while not check():
            await trio.sleep(0.005)


async def test_an_io_thread_stops_writing_into_a_buffer_once_its_gate_closes() -> None:
    async with open_rig(DataConfig(max_record=RECORD, crypto_threads=True)) as rig:
        a, b = await rig.pair()
        data = [os.urandom(RECORD) for _ in range(4)]
        await _stalled_payload(a, b, data[:2], 4 * RECORD)
        dest = bytearray(4 * RECORD)
        gate = WriteGate()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.receive_payload, memoryview(dest), gate,
                               memoryview(bytearray(RECORD)))
            await _until(lambda: dest[RECORD:2 * RECORD] == data[1])
            await gate.close()  # the receiver gives up: the rest goes to scratch
            assert a._sealer is not None
            for rec in data[2:]:
                await a._t.send_all(a._sealer.seal(Kind.PAYLOAD, rec))
        assert dest == data[0] + data[1] + bytes(2 * RECORD)
        await a.send(b"next", b"still in step")  # the stream is intact
        assert await b.receive() == (b"next", bytearray(b"still in step"))


async def test_a_cancelled_io_thread_read_closes_the_channel_at_once() -> None:
    async with open_rig(DataConfig(max_record=RECORD, crypto_threads=True)) as rig:
        a, b = await rig.pair()
        await _stalled_payload(a, b, [os.urandom(RECORD)], 4 * RECORD)
        dest = bytearray(4 * RECORD)
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as scope:  # the sender never sends the rest
                await b.receive_payload(memoryview(dest), WriteGate(),
                                        memoryview(bytearray(RECORD)))
        assert scope.cancelled_caught
        with pytest.raises(PeerLost, match="closed"):
            await b.receive_head()
        with trio.fail_after(5), pytest.raises(PeerLost):
            await a.receive()  # the far side sees the connection go


async def test_a_sender_vanishing_mid_payload_fails_the_io_thread_read() -> None:
    async with open_rig(DataConfig(max_record=RECORD, crypto_threads=True)) as rig:
        a, b = await rig.pair()
        await _stalled_payload(a, b, [os.urandom(RECORD)], 4 * RECORD)

        async def vanish() -> None:
            await _until(lambda: b._io_threads == 1)  # its read is on a thread
            a.abort()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(vanish)
            with trio.fail_after(5), pytest.raises(PeerLost, match=r"ended|truncated|failed"):
                await b.receive_payload(memoryview(bytearray(4 * RECORD)), WriteGate(),
                                        memoryview(bytearray(RECORD)))


async def test_a_forged_record_is_refused_on_an_io_thread() -> None:
    async with open_rig(DataConfig(max_record=RECORD, crypto_threads=True)) as rig:
        a, b = await rig.pair()
        await _stalled_payload(a, b, [os.urandom(RECORD)], 2 * RECORD)
        forged = struct.pack(">BI", Kind.PAYLOAD, RECORD + TAG_SIZE) + os.urandom(RECORD + TAG_SIZE)
        await a._t.send_all(forged)
        with trio.fail_after(5), pytest.raises(ProtocolError, match="authentication"):
            await b.receive_payload(memoryview(bytearray(2 * RECORD)), WriteGate(),
                                    memoryview(bytearray(RECORD)))
        with pytest.raises(PeerLost):  # nothing after a refused record is trusted
            await b.receive_head()
