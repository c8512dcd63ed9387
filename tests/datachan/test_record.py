"""Pure record-layer tests: roundtrip, every kind of stream damage, rekey, limits."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd import aead
from peerd.errors import ProtocolError
from peerd.record import (
    HEADER,
    TAG_SIZE,
    Direction,
    Keying,
    Record,
    RecordOpener,
    RecordSealer,
    derive_key,
    record_pair,
)

SECRET = Keying(bytes(range(32)))
TOKEN = b"t" * 32
KEY = derive_key(SECRET, TOKEN, Direction.INITIATOR_TO_RESPONDER)


def stream(records: list[tuple[int, bytes]], sealer: RecordSealer | None = None) -> list[bytes]:
    sealer = sealer or RecordSealer(KEY, 4096)
    return [sealer.seal(kind, plain) for kind, plain in records]


def open_all(wire: bytes, max_plaintext: int = 4096, step: int = 0) -> list[Record]:
    """Every record of a whole stream (which then ends)."""
    opener = RecordOpener(KEY, max_plaintext)
    out: list[Record] = []
    for i in range(0, len(wire), step or max(1, len(wire))):
        out += opener.receive_data(wire[i : i + (step or len(wire))])
    opener.receive_eof()
    return out


def test_sans_io_imports() -> None:
    root = Path(__file__).resolve().parents[2]
    for rel in ("peerd/record.py", "peerd/dataproto.py"):
        tree = ast.parse((root / rel).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert not names & {"trio", "socket", "time", "asyncio", "threading"}, rel


@pytest.mark.parametrize("step", [0, 1, 7, 4096])
def test_roundtrip_any_chunking(step: int) -> None:
    msgs = [(2, b"head"), (3, os.urandom(4096)), (3, b""), (4, b"x" * 100)]
    got = open_all(b"".join(stream(msgs)), step=step)
    assert [(r.kind, r.plaintext) for r in got] == msgs


def test_keys_differ_by_direction_and_token() -> None:
    other_dir = derive_key(SECRET, TOKEN, Direction.RESPONDER_TO_INITIATOR)
    other_tok = derive_key(SECRET, b"u" * 32, Direction.INITIATOR_TO_RESPONDER)
    x2 = Keying(SECRET.secret, aead.AEGIS128X2)
    other_cipher = derive_key(x2, TOKEN, Direction.INITIATOR_TO_RESPONDER)
    assert len({KEY, other_dir, other_tok, other_cipher}) == 4
    for keying in (SECRET, x2):
        a_seal, a_open = record_pair(keying, TOKEN, initiator=True)
        b_seal, b_open = record_pair(keying, TOKEN, initiator=False)
        assert a_seal.cipher == b_open.cipher == keying.cipher
        assert b_open.receive_data(a_seal.seal(2, b"hi")) == [Record(2, b"hi")]
        assert a_open.receive_data(b_seal.seal(2, b"yo")) == [Record(2, b"yo")]
    # The same key bytes under the other cipher are a different record stream.
    wire = RecordSealer(KEY, 64, cipher=aead.AEGIS128X2).seal(2, b"hi")
    with pytest.raises(ProtocolError, match="authentication"):
        RecordOpener(KEY, 64).receive_data(wire)
    with pytest.raises(ProtocolError):  # a record reflected back to its sender
        a_open.receive_data(a_seal.seal(2, b"hi"))


@pytest.mark.parametrize("where", [0, 3, HEADER.size, HEADER.size + 5, -1])
def test_tamper_detected(where: int) -> None:
    wire = bytearray(stream([(3, b"a" * 64)])[0])
    wire[where] ^= 0x01
    with pytest.raises(ProtocolError):
        open_all(bytes(wire))


def test_reorder_replay_drop_detected() -> None:
    r = stream([(3, b"one"), (3, b"two"), (3, b"three")])
    for bad in ([r[1], r[0]], [r[0], r[0]], [r[0], r[2]]):
        with pytest.raises(ProtocolError):
            open_all(b"".join(bad))


def test_truncation_detected_at_eof() -> None:
    wire = b"".join(stream([(3, b"one"), (3, b"two")]))
    opener = RecordOpener(KEY, 4096)
    assert len(opener.receive_data(wire[:-3])) == 1
    with pytest.raises(ProtocolError):
        opener.receive_eof()
    clean = RecordOpener(KEY, 4096)
    clean.receive_data(wire)
    clean.receive_eof()  # a whole stream ends cleanly


def test_oversized_length_refused_before_buffering() -> None:
    opener = RecordOpener(KEY, 1024)
    with pytest.raises(ProtocolError):
        opener.receive_data(HEADER.pack(3, 1024 + TAG_SIZE + 1) + b"\0" * 10_000)
    assert opener.buffered <= HEADER.size
    with pytest.raises(ProtocolError):  # a failed opener stays failed
        opener.receive_data(b"")
    with pytest.raises(ProtocolError):
        RecordOpener(KEY).parse_header(HEADER.pack(3, TAG_SIZE - 1))


def test_sealer_refuses_oversized_plaintext() -> None:
    with pytest.raises(ValueError):
        RecordSealer(KEY, 16).seal(3, b"x" * 17)


def test_rekey_schedule() -> None:
    sealer = RecordSealer(KEY, 64, rekey_interval=3)
    msgs = [(3, bytes([i]) * 10) for i in range(10)]
    wire = b"".join(stream(msgs, sealer))
    opener = RecordOpener(KEY, 64, rekey_interval=3)
    assert [(r.kind, r.plaintext) for r in opener.receive_data(wire)] == msgs
    assert sealer.statistics().rekeys == 3 == opener.statistics().rekeys
    assert sealer.statistics().records == 10
    # An opener that does not rekey at the same point fails on the 4th record.
    late = RecordOpener(KEY, 64, rekey_interval=4)
    wires = stream(msgs, RecordSealer(KEY, 64, rekey_interval=3))
    assert len(late.receive_data(b"".join(wires[:3]))) == 3
    with pytest.raises(ProtocolError):
        late.receive_data(wires[3])


def test_seal_into_and_open_into_fast_path() -> None:
    sealer, opener = RecordSealer(KEY, 1 << 16), RecordOpener(KEY, 1 << 16)
    plain = os.urandom(50_000)
    out = bytearray(HEADER.size + len(plain) + TAG_SIZE + 10)
    n = sealer.seal_into(3, memoryview(plain), memoryview(out))
    kind, length = opener.parse_header(out[: HEADER.size])
    dest = bytearray(length)
    opener.open_into(kind, memoryview(out)[HEADER.size : n], memoryview(dest))
    assert (kind, bytes(dest)) == (3, plain)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(1, 50))
def test_fuzz_random_bytes_only_protocol_error(chunks: list[bytes], _: int) -> None:
    opener = RecordOpener(KEY, 1024)
    try:
        for c in chunks:
            opener.receive_data(c)
        opener.receive_eof()
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=200)), min_size=1, max_size=5),
    st.data(),
)
def test_fuzz_mutated_streams(msgs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    wire = bytearray(b"".join(stream(msgs)))
    op = data.draw(st.sampled_from(["flip", "cut", "insert", "none"]))
    pos = data.draw(st.integers(0, len(wire) - 1))
    if op == "flip":
        wire[pos] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        del wire[pos : pos + data.draw(st.integers(1, 40))]
    elif op == "insert":
        wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=40))
    step = data.draw(st.integers(1, 300))
    try:
        got = open_all(bytes(wire), step=step)
    except ProtocolError:
        assert op != "none"
        return
    # Whatever got through must be an exact prefix of what was sent.
    assert [(r.kind, r.plaintext) for r in got] == msgs[: len(got)]
    if op == "none":
        assert len(got) == len(msgs)
