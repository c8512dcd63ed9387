"""AEGIS-128L (libsodium, via pynacl) sealing and opening in caller-owned buffers.

The data plane's bulk cipher. AEGIS-128L is an AES-round based AEAD (CAESAR
final portfolio winner for high performance, IRTF CFRG draft) with a 128-bit
key, a 128-bit nonce and (in libsodium) a 256-bit tag; libsodium runs it on
AES-NI (or ARMv8 crypto) instructions. Measured per core on this project's
CPUs (AES-NI, no VAES), 1 MiB records, in place: AEGIS-128L 9.8 GB/s,
AEGIS-256 6.3 GB/s (the cipher before), AES-256-GCM (OpenSSL) ~2.6 GB/s.

Why 128-bit keys: the keys come from an X25519 exchange authenticated by
Ed25519 signatures, both at the ~128-bit security level, so a 256-bit record
key bought no security the handshake had; it cost 1.56x the CPU per byte, and
the data plane is CPU-bound wherever links outrun a core (a 4-peer all-reduce
on one 2-core machine spent a quarter of its CPU in the cipher).

pynacl's public bindings return new ``bytes`` for every call; here its cffi
library is called directly so ciphertext and plaintext land in the caller's
buffers (a record buffer, or the final destination of a payload) without a
copy. Importing ``nacl.bindings`` first runs ``sodium_init``, which selects
the hardware implementation (without it AEGIS runs ~500x slower).
"""

from __future__ import annotations

from typing import Any, Final

import nacl.bindings  # noqa: F401 - runs sodium_init (CPU feature detection)
from nacl._sodium import ffi, lib

KEY_SIZE: Final = int(lib.crypto_aead_aegis128l_keybytes())
NONCE_SIZE: Final = int(lib.crypto_aead_aegis128l_npubbytes())
TAG_SIZE: Final = int(lib.crypto_aead_aegis128l_abytes())
NAME: Final = "AEGIS-128L"

Buffer = bytes | bytearray | memoryview


class AuthenticationFailed(Exception):
    """The ciphertext, tag, nonce or associated data do not match."""


class Aegis128L:
    """One key. ``seal_into``/``open_into`` never allocate a payload-sized object."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes")
        self._key = bytes(key)

    def seal_into(self, nonce: bytes, plaintext: Buffer, aad: bytes, out: Any) -> None:
        """Write ``ciphertext | tag`` (``len(plaintext) + TAG_SIZE`` bytes) to ``out``,
        a writable buffer of exactly that size that does not overlap ``plaintext``."""
        n = len(plaintext)
        if len(nonce) != NONCE_SIZE:
            raise ValueError("bad nonce size")
        if len(out) != n + TAG_SIZE:
            raise ValueError("output buffer must be plaintext + tag bytes")
        # The buffers are given back when the call returns (see open_into).
        with ffi.from_buffer(out, require_writable=True) as dst, ffi.from_buffer(plaintext) as src:
            lib.crypto_aead_aegis128l_encrypt(
                dst, ffi.NULL, src, n, aad, len(aad), ffi.NULL, nonce, self._key
            )

    def open_into(self, nonce: bytes, body: Buffer, aad: bytes, out: Any) -> None:
        """Authenticate ``body`` (``ciphertext | tag``) and write the plaintext to
        ``out`` (exactly ``len(body) - TAG_SIZE`` bytes, not overlapping ``body``).
        Raises ``AuthenticationFailed``; ``out`` may then hold garbage."""
        n = len(body) - TAG_SIZE
        if len(nonce) != NONCE_SIZE:
            raise ValueError("bad nonce size")
        if n < 0 or len(out) != n:
            raise ValueError("output buffer must be body - tag bytes")
        # The buffers are given back when the call returns. Left to the cdata's own
        # end, they outlived the call in any traceback holding this frame: a record
        # refused on a crypto worker thread kept its channel's mmap'd buffer exported
        # through the exception, and the garbage collector crashed the process
        # (SIGSEGV) tearing that cycle down.
        with ffi.from_buffer(out, require_writable=True) as dst, ffi.from_buffer(body) as src:
            rc = lib.crypto_aead_aegis128l_decrypt(
                dst, ffi.NULL, ffi.NULL, src, n + TAG_SIZE, aad, len(aad), nonce, self._key
            )
        if rc != 0:
            raise AuthenticationFailed()
