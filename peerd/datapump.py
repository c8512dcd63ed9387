"""The data plane's record loops in native code, where they were built.

``peerd._datapump`` (C, built by ``pip install``; optional) seals and writes,
or reads, authenticates and decrypts, all records of one message per call
with the GIL released, instead of a Python round per record. Same records,
nonces and keys as ``peerd.record``; the ciphers' function addresses
(``peerd.aead.address``) are handed over once at import.

``SendJob`` and ``ReceiveJob`` keep one message's position between calls
(a call returns when the socket would block, or at a rekey) and keep the
sealer's or opener's key schedule in step. ``available()`` says whether the
module is there and switched on (``PEERD_NATIVE=0`` or ``enable(False)``
switches it off, per message, for comparisons); where it is not,
``peerd.datastream`` runs its Python loops.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from peerd import aead
from peerd.record import HEADER, RecordOpener, RecordSealer

# The C module's ids of the ciphers (its enum; each library has its own signature).
CIPHER_IDS = {aead.AEGIS128L: 0, aead.AEGIS128X2: 1, aead.AEGIS128X4: 2}


def _load() -> Any:
    try:
        _datapump = importlib.import_module("peerd._datapump")
    except ImportError:
        return None
    for name in aead.built():
        _datapump.set_cipher(CIPHER_IDS[name], *aead.address(name))
    return _datapump


_native = _load()
_enabled = os.environ.get("PEERD_NATIVE", "1") != "0"


def built() -> bool:
    """Whether the native module was built and loads."""
    return _native is not None


def available() -> bool:
    """Whether channels use the native loops now: built and switched on."""
    return _native is not None and _enabled


def enable(on: bool) -> None:
    """Switch the native loops on or off for every channel of this process
    from its next message on (benchmarks compare the two on one swarm; tests
    run the Python loops)."""
    global _enabled
    _enabled = on


class Status(IntEnum):
    DONE = 0
    AGAIN = 1
    REKEY = 2
    STOPPED = 3
    OSERROR = 4
    EOF = 5
    BADHEADER = 6
    AUTH = 7


@dataclass
class Progress:
    """What one ``step`` did: its status (and errno), the records it sealed or
    opened and the bytes it wrote or read, over every rekey it went through."""

    status: Status
    errno: int = 0
    records: int = 0
    nbytes: int = 0


class SendJob:
    """One outgoing message: its sealed head in ``wbuf[:head_len]``, then the
    payload's records. ``step`` until it returns ``DONE``."""

    def __init__(self, sealer: RecordSealer, kind: int, payload: Any, wbuf: memoryview,
                 head_len: int) -> None:
        self._sealer = sealer
        self._cipher = CIPHER_IDS[sealer.cipher]
        self._kind = kind
        self._payload = payload
        self._wbuf = wbuf
        self._off = 0
        self._wpos = 0
        self._wlen = head_len
        self.records = 0
        self.written = 0

    def step(self, fd: int, block: bool, stop: bytearray | None = None) -> Progress:
        """Write on; ``AGAIN`` when the socket is full (only without ``block``),
        ``STOPPED`` once ``stop[0]`` is set while blocked, ``OSERROR``; never
        ``REKEY`` (it rekeys and goes on)."""
        assert _native is not None
        done = Progress(Status.AGAIN)
        while True:
            key, epoch, counter, limit = self._sealer.lease()
            (status, err, self._off, self._wpos, self._wlen, records, plain,
             written) = _native.send_step(
                fd, block, stop, self._cipher, key, epoch, counter, limit, self._kind,
                self._sealer.max_plaintext, self._payload, self._off, self._wbuf,
                self._wpos, self._wlen)
            self._sealer.advance(records, plain)
            self.records += records
            self.written += written
            done.records += records
            done.nbytes += written
            if status != Status.REKEY:
                done.status, done.errno = Status(status), err
                return done


class ReceiveJob:
    """The payload records of one incoming message (``length`` bytes), read
    with ``hdr`` and ``rbuf`` (the channel's header and body buffers)."""

    def __init__(self, opener: RecordOpener, kind: int, length: int, hdr: memoryview,
                 rbuf: memoryview) -> None:
        self._opener = opener
        self._cipher = CIPHER_IDS[opener.cipher]
        self._kind = kind
        self._hdr = hdr
        self._rbuf = rbuf
        self._hdr_got = 0
        self._body_got = 0
        self.off = 0
        self.left = length
        self.records = 0
        self.received = 0

    @property
    def mid_record(self) -> bool:
        """Whether part of a record was read (an end of stream now is a truncation)."""
        return self._hdr_got == HEADER.size or self._body_got > 0

    @property
    def header_bytes(self) -> int:
        return self._hdr_got

    def step(self, fd: int, dest: Any, scratch: memoryview | None) -> Progress:
        """Read on without blocking, decrypting into ``dest`` (the whole
        payload's buffer; None: into ``scratch``, dropped). ``AGAIN``,
        ``DONE``, ``EOF``, ``OSERROR``; a bad header or record raises
        ``ProtocolError`` (the opener stays failed)."""
        assert _native is not None
        done = Progress(Status.AGAIN)
        while True:
            key, epoch, counter, limit = self._opener.lease()
            (status, err, self._hdr_got, self._body_got, off, self.left, records,
             nread) = _native.recv_step(
                fd, self._cipher, key, epoch, counter, limit, self._kind,
                self._opener.max_plaintext,
                self._hdr, self._hdr_got, self._rbuf, self._body_got, dest, self.off,
                self.left, scratch)
            self._opener.advance(records, off - self.off)
            self.off = off
            self.records += records
            self.received += nread
            done.records += records
            done.nbytes += nread
            if status == Status.BADHEADER:
                self._refuse_header()
            if status == Status.AUTH:
                raise self._opener.fail("record failed authentication")
            if status != Status.REKEY:
                done.status, done.errno = Status(status), err
                return done

    def _refuse_header(self) -> None:
        """Raise the error the Python loop raises for this header."""
        kind, n = self._opener.parse_header(self._hdr)  # raises on a bad length
        raise self._opener.fail(f"unexpected record kind {kind} ({n} bytes) in a payload "
                                f"with {self.left} bytes left")

