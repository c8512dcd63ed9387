"""Sans-I/O record layer of the data plane: AEAD records over a byte stream.

A record on the wire is::

    u8 kind | u32 big-endian body length | ciphertext | 32-byte tag

where ``body length = len(plaintext) + 32``. The five header bytes are the
AEAD's associated data, so a changed kind or length fails authentication.
The cipher is the session's choice of AEGIS-128X2 or AEGIS-128L
(``peerd.aead``, which says why and why 128-bit keys), with a 256-bit tag.
Keys are derived with the label ``peerd data v4 <cipher>``, so no key is
used with two ciphers, nor any of an earlier version's records (v3: always
AEGIS-128L; v2 AEGIS-256, v1 AES-256-GCM).
Nonces are implicit: ``u32 epoch | u64 record counter`` (zero-padded to the
cipher's 16 bytes) per direction, never sent, never reused (a replayed,
reordered, dropped or injected record fails authentication at the receiver
because its counter no longer matches). Every
``rekey_interval`` records both sides move to the next key, derived by HKDF from
the current one, without any message.

Nothing here does I/O or reads a clock. Every failure on received bytes is a
``ProtocolError``, and an opener that saw one stays failed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peerd import aead
from peerd.aead import AEGIS128L, KEY_SIZE, NONCE_SIZE, TAG_SIZE, AuthenticationFailed, Cipher
from peerd.errors import ProtocolError

HEADER: Final = struct.Struct(">BI")
DEFAULT_MAX_PLAINTEXT: Final = 1024 * 1024
# A new key every 16 M records (16 TiB at 1 MiB records): far inside AEGIS-128L's
# bounds, and it limits what one leaked key exposes.
DEFAULT_REKEY_INTERVAL: Final = 1 << 24
_MAX_EPOCH: Final = (1 << 32) - 1
_INFO_PREFIX: Final = b"peerd data v4 "
_REKEY_INFO: Final = b"peerd data v4 rekey"
_NONCE_PAD: Final = bytes(NONCE_SIZE - 12)


class Direction(Enum):
    """Which way a key protects bytes; the dialer of a connection is the initiator."""

    INITIATOR_TO_RESPONDER = b"initiator->responder"
    RESPONDER_TO_INITIATOR = b"responder->initiator"


def _hkdf(secret: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(secret)


@dataclass(frozen=True)
class Keying:
    """What keys a session's data channels: the secret of its handshake and
    the record cipher both ends chose there (``peerd.aead.choose``)."""

    secret: bytes
    cipher: str = AEGIS128L


def derive_key(keying: Keying, token: bytes, direction: Direction) -> bytes:
    """The first key of one direction of the connection opened with ``token``."""
    if len(keying.secret) < 16:
        raise ValueError("session secret must be at least 16 bytes")
    info = _INFO_PREFIX + keying.cipher.encode() + b" " + direction.value
    return _hkdf(keying.secret, token, info)


def next_key(key: bytes) -> bytes:
    """The key that follows ``key`` after a rekey."""
    return _hkdf(key, None, _REKEY_INFO)


@dataclass(frozen=True)
class RecordStats:
    records: int
    plaintext_bytes: int
    rekeys: int


@dataclass(frozen=True)
class Record:
    kind: int
    plaintext: bytes


class _KeySchedule:
    """Key, epoch and counter of one direction; shared by sealer and opener."""

    def __init__(self, key: bytes, rekey_interval: int, cipher: str) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes")
        if rekey_interval < 1:
            raise ValueError("rekey_interval must be positive")
        self._key = key
        self.cipher = cipher
        self._aead = aead.new(cipher, key)
        self._interval = rekey_interval
        self.epoch = 0
        self.counter = 0
        self.records = 0
        self.plaintext_bytes = 0

    def _rekey_if_due(self) -> None:
        if self.counter >= self._interval:
            if self.epoch >= _MAX_EPOCH:
                raise ProtocolError("record key schedule exhausted")
            self._key = next_key(self._key)
            self._aead = aead.new(self.cipher, self._key)
            self.epoch += 1
            self.counter = 0

    def next_nonce(self, plaintext_len: int) -> tuple[Cipher, bytes]:
        """The cipher and nonce for the next record; advances the counter."""
        self._rekey_if_due()
        nonce = self.epoch.to_bytes(4, "big") + self.counter.to_bytes(8, "big") + _NONCE_PAD
        self.counter += 1
        self.records += 1
        self.plaintext_bytes += plaintext_len
        return self._aead, nonce

    def lease(self) -> tuple[bytes, int, int, int]:
        """``(key, epoch, counter, records left)`` for a native loop that
        seals or opens up to that many records, then reports them to
        ``advance``; rekeys first where the key is used up."""
        self._rekey_if_due()
        return self._key, self.epoch, self.counter, self._interval - self.counter

    def advance(self, records: int, plaintext_bytes: int) -> None:
        """Count ``records`` sealed or opened under the leased key."""
        self.counter += records
        self.records += records
        self.plaintext_bytes += plaintext_bytes

    def stats(self) -> RecordStats:
        return RecordStats(self.records, self.plaintext_bytes, self.epoch)


def record_size(plaintext_len: int) -> int:
    """Bytes on the wire for a record carrying ``plaintext_len`` bytes."""
    return HEADER.size + plaintext_len + TAG_SIZE


class _Direction:
    """What sealer and opener share: one direction's key schedule and limit."""

    def __init__(
        self,
        key: bytes,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        cipher: str = AEGIS128L,
    ) -> None:
        self._keys = _KeySchedule(key, rekey_interval, cipher)
        self.max_plaintext = max_plaintext

    @property
    def cipher(self) -> str:
        return self._keys.cipher

    def lease(self) -> tuple[bytes, int, int, int]:
        """The key schedule for ``peerd.datapump`` (see ``_KeySchedule.lease``)."""
        return self._keys.lease()

    def advance(self, records: int, plaintext_bytes: int) -> None:
        self._keys.advance(records, plaintext_bytes)

    def statistics(self) -> RecordStats:
        return self._keys.stats()


class RecordSealer(_Direction):
    """Encrypts outgoing records of one direction."""

    def seal_into(self, kind: int, plaintext: memoryview | bytes, out: memoryview) -> int:
        """Write one whole record for ``plaintext`` at the start of ``out``.

        Returns the record's size. ``out`` must hold ``record_size(len(plaintext))``
        bytes and must not overlap ``plaintext``.
        """
        n = len(plaintext)
        if not 0 <= kind <= 255:
            raise ValueError("record kind must fit a byte")
        if n > self.max_plaintext:
            raise ValueError(f"record plaintext of {n} bytes exceeds {self.max_plaintext}")
        total = record_size(n)
        if len(out) < total:
            raise ValueError("output buffer too small for record")
        HEADER.pack_into(out, 0, kind, n + TAG_SIZE)
        aad = bytes(out[: HEADER.size])
        aead, nonce = self._keys.next_nonce(n)
        aead.seal_into(nonce, plaintext, aad, out[HEADER.size : total])
        return total

    def seal(self, kind: int, plaintext: bytes | memoryview) -> bytes:
        """One whole record as new bytes (for small control records)."""
        out = bytearray(record_size(len(plaintext)))
        self.seal_into(kind, plaintext, memoryview(out))
        return bytes(out)


class RecordOpener(_Direction):
    """Authenticates and decrypts incoming records of one direction.

    Two ways in, never mixed within one record: ``receive_data`` takes arbitrary
    chunks and returns whole records (it buffers at most one record); the fast
    path ``parse_header`` + ``open_into`` lets a driver read the body into its
    own buffer and decrypt straight into the final destination.
    """

    def __init__(
        self,
        key: bytes,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        cipher: str = AEGIS128L,
    ) -> None:
        super().__init__(key, max_plaintext, rekey_interval, cipher)
        self._buf = bytearray()
        self._need = HEADER.size  # bytes the current header or record needs in _buf
        self._failed: ProtocolError | None = None

    def fail(self, why: str) -> ProtocolError:
        """Mark the stream failed (every later use raises); returns the error."""
        self._failed = ProtocolError(why)
        return self._failed

    def lease(self) -> tuple[bytes, int, int, int]:
        self._check()  # a failed stream opens nothing more
        return super().lease()

    def _check(self) -> None:
        if self._failed is not None:
            raise ProtocolError(f"record stream already failed: {self._failed}")

    def parse_header(self, header: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Validate a 5-byte header; returns ``(kind, plaintext length)``.

        Refuses a length over ``max_plaintext`` before anything is allocated.
        """
        self._check()
        if len(header) != HEADER.size:
            raise self.fail("short record header")
        kind, body = HEADER.unpack(header)
        if body < TAG_SIZE:
            raise self.fail(f"record body of {body} bytes is shorter than its tag")
        if body - TAG_SIZE > self.max_plaintext:
            raise self.fail(f"record of {body - TAG_SIZE} bytes exceeds {self.max_plaintext}")
        return kind, body - TAG_SIZE

    def open_into(
        self, kind: int, body: memoryview | bytes | bytearray, out: memoryview | bytearray
    ) -> None:
        """Authenticate ``body`` (ciphertext + tag) and decrypt it into ``out``.

        ``kind`` and ``len(body)`` must come from ``parse_header``; ``out`` must
        be exactly ``len(body) - TAG_SIZE`` bytes. On failure ``out`` may hold garbage.
        """
        self._check()
        n = len(body) - TAG_SIZE
        if n < 0 or n > self.max_plaintext or len(out) != n:
            raise ValueError("open_into buffers do not match the parsed header")
        aad = HEADER.pack(kind, n + TAG_SIZE)
        aead, nonce = self._keys.next_nonce(n)
        try:
            aead.open_into(nonce, body, aad, out)
        except AuthenticationFailed:
            raise self.fail("record failed authentication") from None

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Consume a chunk of the stream; return every record it completed."""
        self._check()
        view = memoryview(data).cast("B")
        out: list[Record] = []
        pos = 0
        while pos < len(view):
            take = min(self._need - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) < self._need:
                break
            if self._need == HEADER.size:
                _, n = self.parse_header(self._buf)
                self._need = record_size(n)  # always more than a header: body >= tag
                continue
            kind = self._buf[0]
            body = memoryview(self._buf)[HEADER.size :]
            plain = bytearray(len(body) - TAG_SIZE)
            self.open_into(kind, body, plain)
            body.release()
            out.append(Record(kind, bytes(plain)))
            self._buf.clear()
            self._need = HEADER.size
        return out

    def receive_eof(self) -> None:
        """The stream ended; a partly received record means truncation."""
        self._check()
        if self._buf:
            raise self.fail(f"stream truncated inside a record ({len(self._buf)} bytes)")

    @property
    def buffered(self) -> int:
        return len(self._buf)


def record_pair(
    keying: Keying,
    token: bytes,
    initiator: bool,
    max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
    rekey_interval: int = DEFAULT_REKEY_INTERVAL,
) -> tuple[RecordSealer, RecordOpener]:
    """Sealer and opener for one end (the dialer is the initiator)."""
    i2r = derive_key(keying, token, Direction.INITIATOR_TO_RESPONDER)
    r2i = derive_key(keying, token, Direction.RESPONDER_TO_INITIATOR)
    send_key, recv_key = (i2r, r2i) if initiator else (r2i, i2r)
    return (
        RecordSealer(send_key, max_plaintext, rekey_interval, keying.cipher),
        RecordOpener(recv_key, max_plaintext, rekey_interval, keying.cipher),
    )
