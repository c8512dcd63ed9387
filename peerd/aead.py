"""The data plane's record ciphers, sealing and opening in caller-owned buffers.

Three AEGIS variants (CAESAR final portfolio winner for high performance, IRTF
CFRG draft), all with a 128-bit key, a 128-bit nonce and a 256-bit tag:

- ``aegis128x2``: AEGIS-128X2 from libaegis (the ``pyaegis`` package, an
  optional dependency). Two AEGIS-128L lanes side by side, so CPUs with
  256-bit vector AES (VAES) run both in one instruction; elsewhere libaegis
  runs it on AES-NI at about AEGIS-128L's speed. Measured per core on this
  project's 2-core VMs (AMD EPYC with VAES), 1 MiB records: 21.7 GB/s
  sealing, 20.1 GB/s opening, against 12.4 and 12.1 for AEGIS-128L.
- ``aegis128x4``: AEGIS-128X4, also libaegis: four lanes, one 512-bit VAES
  instruction on CPUs with AVX-512. There, 4 MiB records (session 18, a
  2-core VM with AVX-512): 47.6 GB/s sealing and 55.1 opening, against
  AEGIS-128X2's 31.0 and 34.7; on 256-bit VAES it is the slower one (22
  against 26 GB/s sealing on the EPYC VMs).
- ``aegis128l``: AEGIS-128L from libsodium (pynacl, always there).

Both sides offer what they have in the session handshake, fastest first for
their own CPU (``built``: AEGIS-128X4 leads where the CPU has AVX-512 and
VAES), and the data channels use the first cipher of the dialler's list that
the other side offers (``choose``), so a peer without ``pyaegis`` still
talks to everyone.
The cipher's name is part of every data key's derivation
(``peerd.record.derive_key``): no key is ever used with two ciphers.

Why 128-bit keys: the keys come from an X25519 exchange authenticated by
Ed25519 signatures, both at the ~128-bit security level, so a 256-bit record
key bought no security the handshake had; AEGIS-256 cost 1.56x the CPU per
byte, and the data plane is CPU-bound wherever links outrun a core (a 4-peer
all-reduce on one 2-core machine spent a quarter of its CPU in the cipher).

Both libraries are called through their cffi modules directly, so
ciphertext and plaintext land in the caller's buffers (a record buffer, or
the final destination of a payload) without a copy; ``peerd.datapump``
hands the same functions' addresses to the native record loops. Importing
``nacl.bindings`` runs ``sodium_init`` and importing ``pyaegis`` runs
``aegis_init``: both select the hardware implementation (without it AEGIS
runs ~500x slower).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final, Protocol

import nacl.bindings  # noqa: F401 - runs sodium_init (CPU feature detection)
from nacl._sodium import ffi as _sodium_ffi
from nacl._sodium import lib as _sodium

from peerd.errors import AuthError

try:
    import pyaegis  # noqa: F401 - runs aegis_init (CPU feature detection)
    from pyaegis._aegis_ffi import ffi as _aegis_ffi
    from pyaegis._aegis_ffi import lib as _aegis
except ImportError:  # optional: without it only AEGIS-128L is offered
    _aegis_ffi = _aegis = None

KEY_SIZE: Final = 16
NONCE_SIZE: Final = 16
TAG_SIZE: Final = 32
AEGIS128L: Final = "aegis128l"
AEGIS128X2: Final = "aegis128x2"
AEGIS128X4: Final = "aegis128x4"
MAX_OFFER: Final = 8  # cipher names a peer may offer in its handshake
MAX_NAME: Final = 32
# The record format (peerd.record, peerd._datapump) takes these sizes for
# every cipher; libsodium's own say so for AEGIS-128L.
assert (_sodium.crypto_aead_aegis128l_keybytes(), _sodium.crypto_aead_aegis128l_npubbytes(),
        _sodium.crypto_aead_aegis128l_abytes()) == (KEY_SIZE, NONCE_SIZE, TAG_SIZE)

Buffer = bytes | bytearray | memoryview


class AuthenticationFailed(Exception):
    """The ciphertext, tag, nonce or associated data do not match."""


class Cipher(Protocol):
    """One key of one record cipher."""

    name: str

    def seal_into(self, nonce: bytes, plaintext: Buffer, aad: bytes, out: Any) -> None: ...

    def open_into(self, nonce: bytes, body: Buffer, aad: bytes, out: Any) -> None: ...


def _check_seal(nonce: bytes, plaintext: Buffer, out: Any) -> int:
    n = len(plaintext)
    if len(nonce) != NONCE_SIZE:
        raise ValueError("bad nonce size")
    if len(out) != n + TAG_SIZE:
        raise ValueError("output buffer must be plaintext + tag bytes")
    return n


def _check_open(nonce: bytes, body: Buffer, out: Any) -> int:
    n = len(body) - TAG_SIZE
    if len(nonce) != NONCE_SIZE:
        raise ValueError("bad nonce size")
    if n < 0 or len(out) != n:
        raise ValueError("output buffer must be body - tag bytes")
    return n


class _Keyed:
    __slots__ = ("_key",)
    name = ""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes")
        self._key = bytes(key)


class Aegis128L(_Keyed):
    """AEGIS-128L (libsodium). ``seal_into``/``open_into`` never allocate a
    payload-sized object."""

    __slots__ = ()
    name = AEGIS128L

    def seal_into(self, nonce: bytes, plaintext: Buffer, aad: bytes, out: Any) -> None:
        """Write ``ciphertext | tag`` (``len(plaintext) + TAG_SIZE`` bytes) to ``out``,
        a writable buffer of exactly that size that does not overlap ``plaintext``."""
        n = _check_seal(nonce, plaintext, out)
        # The buffers are given back when the call returns (see open_into).
        with _sodium_ffi.from_buffer(out, require_writable=True) as dst, \
                _sodium_ffi.from_buffer(plaintext) as src:
            _sodium.crypto_aead_aegis128l_encrypt(
                dst, _sodium_ffi.NULL, src, n, aad, len(aad), _sodium_ffi.NULL, nonce, self._key
            )

    def open_into(self, nonce: bytes, body: Buffer, aad: bytes, out: Any) -> None:
        """Authenticate ``body`` (``ciphertext | tag``) and write the plaintext to
        ``out`` (exactly ``len(body) - TAG_SIZE`` bytes, not overlapping ``body``).
        Raises ``AuthenticationFailed``; ``out`` may then hold garbage."""
        n = _check_open(nonce, body, out)
        # The buffers are given back when the call returns. Left to the cdata's own
        # end, they outlived the call in any traceback holding this frame: a record
        # refused on a crypto worker thread kept its channel's mmap'd buffer exported
        # through the exception, and the garbage collector crashed the process
        # (SIGSEGV) tearing that cycle down.
        with _sodium_ffi.from_buffer(out, require_writable=True) as dst, \
                _sodium_ffi.from_buffer(body) as src:
            rc = _sodium.crypto_aead_aegis128l_decrypt(
                dst, _sodium_ffi.NULL, _sodium_ffi.NULL, src, n + TAG_SIZE, aad, len(aad),
                nonce, self._key
            )
        if rc != 0:
            raise AuthenticationFailed()


class _LibAegis(_Keyed):
    """An AEGIS-128X variant of libaegis (via ``pyaegis``); same contract as
    ``Aegis128L``. Subclasses name the variant's combined-mode calls."""

    __slots__ = ()
    calls: tuple[str, str] = ("", "")

    def __init__(self, key: bytes) -> None:
        if _aegis is None:
            raise RuntimeError(f"{self.name} needs the pyaegis package (pip install pyaegis)")
        super().__init__(key)

    def seal_into(self, nonce: bytes, plaintext: Buffer, aad: bytes, out: Any) -> None:
        assert _aegis_ffi is not None and _aegis is not None
        n = _check_seal(nonce, plaintext, out)
        with _aegis_ffi.from_buffer(out, require_writable=True) as dst, \
                _aegis_ffi.from_buffer(plaintext) as src:
            getattr(_aegis, self.calls[0])(dst, TAG_SIZE, src, n, aad, len(aad), nonce,
                                           self._key)

    def open_into(self, nonce: bytes, body: Buffer, aad: bytes, out: Any) -> None:
        assert _aegis_ffi is not None and _aegis is not None
        n = _check_open(nonce, body, out)
        with _aegis_ffi.from_buffer(out, require_writable=True) as dst, \
                _aegis_ffi.from_buffer(body) as src:
            rc = getattr(_aegis, self.calls[1])(dst, src, n + TAG_SIZE, TAG_SIZE, aad,
                                                len(aad), nonce, self._key)
        if rc != 0:
            raise AuthenticationFailed()


class Aegis128X2(_LibAegis):
    __slots__ = ()
    name = AEGIS128X2
    calls = ("aegis128x2_encrypt", "aegis128x2_decrypt")


class Aegis128X4(_LibAegis):
    __slots__ = ()
    name = AEGIS128X4
    calls = ("aegis128x4_encrypt", "aegis128x4_decrypt")


_CIPHERS: Final[dict[str, type[Aegis128L] | type[_LibAegis]]] = {
    AEGIS128X4: Aegis128X4,
    AEGIS128X2: Aegis128X2,
    AEGIS128L: Aegis128L,
}


def wide_vector_aes(cpuinfo: str | None = None) -> bool:
    """True when the CPU runs AES on 512-bit vectors (AVX-512F and VAES), where
    AEGIS-128X4 is the fastest; read from ``/proc/cpuinfo`` (False elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read(1 << 16)  # the first processor's entry is enough
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return {"avx512f", "vaes"} <= flags
    return False


_WIDE: Final = wide_vector_aes()


def new(name: str, key: bytes) -> Cipher:
    """A keyed cipher by name (one of ``built()``)."""
    if name not in built():
        raise ValueError(f"record cipher {name!r} is not available here")
    return _CIPHERS[name](key)


def built() -> tuple[str, ...]:
    """The ciphers this process can run, fastest first on this CPU."""
    wide = (AEGIS128X4, AEGIS128X2) if _WIDE else (AEGIS128X2, AEGIS128X4)
    return (wide if _aegis is not None else ()) + (AEGIS128L,)


def check_offer(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as an offer, if this install has every one of them; else a
    ValueError that says what to use instead."""
    have = built()
    unknown = [n for n in names if n not in have]
    if unknown or not names:
        what = ", ".join(unknown) if unknown else "no cipher"
        raise ValueError(f"{what}: not a cipher this install has; use some of "
                         f"{', '.join(have)} (aegis128x2 and aegis128x4 need pip install pyaegis)")
    return tuple(names)


def supported() -> tuple[str, ...]:
    """The ciphers this process offers, fastest first: ``built()``, limited by
    ``PEERD_CIPHERS`` (comma-separated names, to compare ciphers or pin one)."""
    limit = os.environ.get("PEERD_CIPHERS", "").strip()
    names = built()
    if not limit:
        return names
    wanted = [w.strip() for w in limit.split(",") if w.strip()]
    offer = tuple(n for n in names if n in wanted)
    if not offer:
        raise ValueError(f"PEERD_CIPHERS={limit!r} names no cipher this install has; "
                         f"use some of: {', '.join(names)}")
    return offer


def choose(dialler: Sequence[str], listener: Sequence[str]) -> str:
    """The cipher of a session's data channels: the first of the dialler's
    offer (the QUIC client's) that the listener also offers. Both ends run
    this on the same two lists, so they agree without another message."""
    for name in dialler:
        if name in listener:
            return name
    raise AuthError(f"no common data cipher: we offer {', '.join(dialler) or 'none'}, "
                    f"the peer {', '.join(listener) or 'none'}")


def address(name: str) -> tuple[int, int]:
    """``(encrypt, decrypt)`` function addresses of a cipher's combined-mode
    calls, for ``peerd._datapump`` (which knows each library's signature)."""
    cls = _CIPHERS.get(name)
    if name == AEGIS128L:
        ffi, lib, calls = _sodium_ffi, _sodium, ("crypto_aead_aegis128l_encrypt",
                                                  "crypto_aead_aegis128l_decrypt")
    elif cls is not None and issubclass(cls, _LibAegis) and _aegis is not None:
        ffi, lib, calls = _aegis_ffi, _aegis, cls.calls
    else:
        raise ValueError(f"record cipher {name!r} is not available here")
    enc, dec = (int(ffi.cast("uintptr_t", ffi.addressof(lib, c))) for c in calls)
    return enc, dec
