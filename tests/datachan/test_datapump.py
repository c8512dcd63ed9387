"""The native record loops (peerd._datapump) against the Python record layer.

Each test drives ``SendJob``/``ReceiveJob`` over a real socket pair and checks
the bytes against ``peerd.record``, the reference: same records, nonces and
rekeys, and every kind of bad record refused as the Python loop refuses it.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from peerd import aead, datapump
from peerd.dataproto import Kind
from peerd.datapump import Progress, ReceiveJob, SendJob, Status
from peerd.errors import ProtocolError
from peerd.record import (
    DEFAULT_REKEY_INTERVAL,
    HEADER,
    TAG_SIZE,
    RecordOpener,
    RecordSealer,
    record_size,
)

KEY = bytes(range(16))
MAX = 4096


CIPHER = {"name": aead.AEGIS128L}  # the current test's cipher (set by ``each_cipher``)


@pytest.fixture(autouse=True)
def native_built() -> None:
    assert datapump.built(), "peerd._datapump is not built: pip install -e . with a C compiler"


@pytest.fixture(autouse=True, params=[aead.AEGIS128X4, aead.AEGIS128X2, aead.AEGIS128L])
def each_cipher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with each record cipher (the C module calls each
    library with its own signature)."""
    assert request.param in aead.built(), f"{request.param} is not available"
    monkeypatch.setitem(CIPHER, "name", request.param)


def sealer_(rekey_interval: int = DEFAULT_REKEY_INTERVAL) -> RecordSealer:
    return RecordSealer(KEY, MAX, rekey_interval, CIPHER["name"])


def opener_(rekey_interval: int = DEFAULT_REKEY_INTERVAL) -> RecordOpener:
    return RecordOpener(KEY, MAX, rekey_interval, CIPHER["name"])


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def wbuf() -> memoryview:
    return memoryview(bytearray(record_size(MAX) + 256))


def send_all(sock: socket.socket, sealer: RecordSealer, head: bytes, payload: bytes) -> SendJob:
    """A whole message through the native sender (the reader keeps up: the
    socket pair's buffer holds the test's messages)."""
    buf = wbuf()
    job = SendJob(sealer, Kind.PAYLOAD, payload, buf, sealer.seal_into(Kind.HEAD, head, buf))
    assert job.step(sock.fileno(), True).status == Status.DONE
    return job


def read_available(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def receive(sock: socket.socket, opener: RecordOpener, length: int,
            dest: bytearray | None) -> tuple[ReceiveJob, Progress]:
    """Read a message's head with the Python layer, then its payload natively."""
    hdr = memoryview(bytearray(HEADER.size))
    rbuf = memoryview(bytearray(MAX + TAG_SIZE))
    raw = sock.recv(HEADER.size)
    kind, n = opener.parse_header(raw)
    body = sock.recv(n + TAG_SIZE)
    opener.open_into(kind, body, bytearray(n))
    job = ReceiveJob(opener, Kind.PAYLOAD, length, hdr, rbuf)
    scratch = memoryview(bytearray(MAX))
    return job, job.step(sock.fileno(), None if dest is None else memoryview(dest), scratch)


def test_native_records_are_the_python_layers_records(pair) -> None:
    a, b = pair
    payload = os.urandom(3 * MAX + 123)
    job = send_all(a, sealer_(), b"head", payload)
    assert job.records == 4
    records = opener_().receive_data(read_available(b))
    assert [r.kind for r in records] == [Kind.HEAD] + [Kind.PAYLOAD] * 4
    assert b"".join(r.plaintext for r in records[1:]) == payload


def test_python_records_open_natively_into_place(pair) -> None:
    a, b = pair
    sealer = sealer_()
    payload = os.urandom(2 * MAX + 7)
    a.sendall(sealer.seal(Kind.HEAD, b"h") + b"".join(
        sealer.seal(Kind.PAYLOAD, payload[i : i + MAX]) for i in range(0, len(payload), MAX)))
    opener = opener_()
    dest = bytearray(len(payload))
    job, p = receive(b, opener, len(payload), dest)
    assert p.status == Status.DONE and job.left == 0 and bytes(dest) == payload
    assert opener.statistics() == sealer.statistics()


def test_rekeys_in_the_middle_of_a_message_stay_in_step(pair) -> None:
    a, b = pair
    sealer, opener = sealer_(rekey_interval=3), opener_(rekey_interval=3)
    payload = os.urandom(10 * MAX)  # head + 10 records: three rekeys
    sent = send_all(a, sealer, b"", payload)
    assert sent.records == 10 and sent.written == record_size(0) + 10 * record_size(MAX)
    dest = bytearray(len(payload))
    _, p = receive(b, opener, len(payload), dest)
    assert p.status == Status.DONE and bytes(dest) == payload
    assert p.records == 10 and p.nbytes == 10 * record_size(MAX)  # over all four keys
    assert sealer.statistics().rekeys == opener.statistics().rekeys == 3
    # and the Python layer carries on with the same schedule afterwards
    a.sendall(sealer.seal(Kind.HEAD, b"next"))
    assert [r.plaintext for r in opener.receive_data(read_available(b))] == [b"next"]


def test_a_payload_arriving_in_pieces_is_assembled_across_calls(pair) -> None:
    a, b = pair
    sealer, opener = sealer_(), opener_()
    payload = os.urandom(2 * MAX)
    wire = sealer.seal(Kind.HEAD, b"") + b"".join(
        sealer.seal(Kind.PAYLOAD, payload[i : i + MAX]) for i in (0, MAX))
    head_len = record_size(0)
    a.sendall(wire[: head_len + 3])  # the head and part of a header
    dest = bytearray(len(payload))
    job, p = receive(b, opener, len(payload), dest)
    assert p.status == Status.AGAIN and job.mid_record is False and job.header_bytes == 3
    a.sendall(wire[head_len + 3 : head_len + 100])  # into the first body
    assert job.step(b.fileno(), memoryview(dest), None).status == Status.AGAIN
    assert job.mid_record
    a.sendall(wire[head_len + 100 :])
    assert job.step(b.fileno(), memoryview(dest), None).status == Status.DONE
    assert bytes(dest) == payload


def test_without_a_destination_records_are_authenticated_and_dropped(pair) -> None:
    a, b = pair
    sealer, opener = sealer_(), opener_()
    send_all(a, sealer, b"", os.urandom(MAX + 1))
    job, p = receive(b, opener, MAX + 1, None)
    assert p.status == Status.DONE and job.records == 2 and job.off == MAX + 1


@pytest.mark.parametrize("damage, why", [
    ("kind", "unexpected record kind 2 "),
    ("too_long_for_message", r"kind 3 \(105 bytes\) in a payload with 100"),
    ("over_max_record", "exceeds 4096"),
    ("body", "failed authentication"),
    ("tag", "failed authentication"),
])
def test_bad_records_are_refused_like_the_python_loop_refuses_them(pair, damage, why) -> None:
    a, b = pair
    sealer = sealer_()
    payload = os.urandom(100)
    head = sealer.seal(Kind.HEAD, b"")
    if damage == "kind":
        rec = bytearray(sealer.seal(Kind.HEAD, payload))
    elif damage == "too_long_for_message":
        rec = bytearray(sealer.seal(Kind.PAYLOAD, payload + b"extra"))
    elif damage == "over_max_record":
        rec = bytearray(HEADER.pack(Kind.PAYLOAD, MAX + 1 + TAG_SIZE))
    else:
        rec = bytearray(sealer.seal(Kind.PAYLOAD, payload))
        rec[HEADER.size if damage == "body" else -1] ^= 1
    a.sendall(head + bytes(rec))
    opener = opener_()
    dest = bytearray(len(payload))
    with pytest.raises(ProtocolError, match=why):
        receive(b, opener, len(payload), dest)
    with pytest.raises(ProtocolError, match="already failed"):  # the stream stays failed
        opener.lease()


def test_end_of_stream_is_reported_with_where_it_fell(pair) -> None:
    a, b = pair
    sealer = sealer_()
    rec = sealer.seal(Kind.HEAD, b"") + sealer.seal(Kind.PAYLOAD, b"x" * 50)
    a.sendall(rec[:-10])
    a.shutdown(socket.SHUT_WR)
    job, p = receive(b, opener_(), 50, bytearray(50))
    assert p.status == Status.EOF and job.mid_record


def test_blocked_sender_stops_when_told(pair) -> None:
    a, _ = pair  # nobody reads: the sender fills the socket and blocks
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sealer, stop = sealer_(), bytearray(1)
    buf = wbuf()
    job = SendJob(sealer, Kind.PAYLOAD, bytes(64 * MAX), buf,
                  sealer.seal_into(Kind.HEAD, b"", buf))
    got: list[Progress] = []
    blocked = threading.Event()

    def run() -> None:
        # Fill without blocking first, so the blocking call below must wait.
        while job.step(a.fileno(), False).status != Status.AGAIN:
            pass
        blocked.set()
        got.append(job.step(a.fileno(), True, stop))

    worker = threading.Thread(target=run)
    worker.start()
    assert blocked.wait(10)
    stop[0] = 1
    worker.join(10)
    assert not worker.is_alive() and got[0].status == Status.STOPPED


def test_write_errors_come_back_with_their_errno(pair) -> None:
    a, b = pair
    b.close()
    sealer = sealer_()
    buf = wbuf()
    job = SendJob(sealer, Kind.PAYLOAD, bytes(MAX), buf, sealer.seal_into(Kind.HEAD, b"", buf))
    p = job.step(a.fileno(), True)
    assert p.status == Status.OSERROR and p.errno == errno.EPIPE
