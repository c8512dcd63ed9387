"""The in-place AEGIS-128L wrapper agrees with pynacl's public API and refuses forgeries."""

from __future__ import annotations

import os

import nacl.bindings as nb
import pytest

from peerd.aead import KEY_SIZE, NONCE_SIZE, TAG_SIZE, Aegis128L, AuthenticationFailed

KEY = bytes(range(KEY_SIZE))
NONCE = bytes(range(100, 100 + NONCE_SIZE))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 1 << 20])
def test_same_bytes_as_public_api_and_roundtrip(size: int) -> None:
    plain = os.urandom(size)
    out = bytearray(size + TAG_SIZE)
    Aegis128L(KEY).seal_into(NONCE, memoryview(plain), b"aad", memoryview(out))
    assert bytes(out) == nb.crypto_aead_aegis128l_encrypt(plain, b"aad", NONCE, KEY)
    back = bytearray(size)
    Aegis128L(KEY).open_into(NONCE, bytes(out), b"aad", memoryview(back))
    assert back == plain


def test_writes_into_a_slice_of_a_larger_buffer() -> None:
    plain = os.urandom(1000)
    big = bytearray(2000)
    Aegis128L(KEY).seal_into(NONCE, plain, b"", memoryview(big)[7 : 7 + 1000 + TAG_SIZE])
    assert big[:7] == bytes(7) and big[7 + 1000 + TAG_SIZE :] == bytes(2000 - 1007 - TAG_SIZE)
    dest = bytearray(3000)
    Aegis128L(KEY).open_into(NONCE, memoryview(big)[7 : 7 + 1000 + TAG_SIZE], b"",
                            memoryview(dest)[500:1500])
    assert dest[500:1500] == plain and dest[:500] == bytes(500)


@pytest.mark.parametrize("what", ["body", "tag", "aad", "nonce", "key"])
def test_any_change_fails_authentication(what: str) -> None:
    sealed = bytearray(64 + TAG_SIZE)
    Aegis128L(KEY).seal_into(NONCE, b"x" * 64, b"hdr", sealed)
    key, nonce, aad = KEY, NONCE, b"hdr"
    if what == "body":
        sealed[3] ^= 1
    elif what == "tag":
        sealed[-1] ^= 0x80
    elif what == "aad":
        aad = b"hds"
    elif what == "nonce":
        nonce = bytes([NONCE[0] ^ 1]) + NONCE[1:]
    else:
        key = bytes([KEY[0] ^ 1]) + KEY[1:]
    with pytest.raises(AuthenticationFailed):
        Aegis128L(key).open_into(nonce, sealed, aad, bytearray(64))


def test_size_mismatches_are_refused_before_any_crypto() -> None:
    a = Aegis128L(KEY)
    with pytest.raises(ValueError):
        a.seal_into(NONCE, b"abc", b"", bytearray(3 + TAG_SIZE - 1))
    with pytest.raises(ValueError):
        a.open_into(NONCE, bytes(TAG_SIZE + 3), b"", bytearray(4))
    with pytest.raises(ValueError):
        a.open_into(NONCE, bytes(TAG_SIZE - 1), b"", bytearray(0))
    with pytest.raises(ValueError):
        a.seal_into(NONCE[:12], b"abc", b"", bytearray(3 + TAG_SIZE))
    with pytest.raises(ValueError):
        Aegis128L(KEY[:8])
    with pytest.raises(BufferError):
        a.open_into(NONCE, bytes(TAG_SIZE + 3), b"", b"abc")  # read-only destination
