"""The in-place cipher wrappers agree with each library's public API, meet the
AEGIS draft's known answer, refuse forgeries; and the cipher choice."""

from __future__ import annotations

import os
from collections.abc import Callable

import nacl.bindings as nb
import pytest

from peerd import aead
from peerd.aead import KEY_SIZE, NONCE_SIZE, TAG_SIZE, AuthenticationFailed
from peerd.errors import AuthError

KEY = bytes(range(KEY_SIZE))
NONCE = bytes(range(100, 100 + NONCE_SIZE))


def _x2_public(plain: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    import pyaegis

    return pyaegis.Aegis128X2(tag_size=TAG_SIZE).encrypt(key, nonce, plain, aad)


def _x4_public(plain: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    import pyaegis

    return pyaegis.Aegis128X4(tag_size=TAG_SIZE).encrypt(key, nonce, plain, aad)


PUBLIC: dict[str, Callable[[bytes, bytes, bytes, bytes], bytes]] = {
    aead.AEGIS128L: nb.crypto_aead_aegis128l_encrypt,
    aead.AEGIS128X2: _x2_public,
    aead.AEGIS128X4: _x4_public,
}


@pytest.fixture(params=[aead.AEGIS128X4, aead.AEGIS128X2, aead.AEGIS128L])
def cipher(request: pytest.FixtureRequest) -> str:
    assert request.param in aead.built(), f"{request.param} is not available"
    return str(request.param)


def test_aegis128x2_meets_the_drafts_known_answer() -> None:
    """draft-irtf-cfrg-aegis-aead, AEGIS-128X2 test vector 1 (empty message
    and data, 256-bit tag): the library and our wrapper are that cipher."""
    key, nonce = bytes(range(16)), bytes(range(16, 32))
    out = bytearray(TAG_SIZE)
    aead.new(aead.AEGIS128X2, key).seal_into(nonce, b"", b"", memoryview(out))
    assert out.hex() == "b92c71fdbd358b8a4de70b27631ace90cffd9b9cfba82028412bac41b4f53759"


def test_aegis128x4_meets_the_drafts_known_answer() -> None:
    """draft-irtf-cfrg-aegis-aead, AEGIS-128X4 test vector 1 (as for X2)."""
    key, nonce = bytes(range(16)), bytes(range(16, 32))
    out = bytearray(TAG_SIZE)
    aead.new(aead.AEGIS128X4, key).seal_into(nonce, b"", b"", memoryview(out))
    assert out.hex() == "a4b25437f4be93cfa856a2f27e4416b42cac79fd4698f2cdbe6af25673e10a68"


@pytest.mark.parametrize(("flags", "wide"), [
    ("fpu sse2 avx2 aes vaes vpclmulqdq avx512f avx512bw", True),  # e.g. Ice Lake, Zen 4
    ("fpu sse2 avx2 aes vaes vpclmulqdq", False),  # Zen 3: 256-bit VAES only
    ("fpu sse2 avx2 aes avx512f", False),  # Skylake-SP: AVX-512 without VAES
    ("", False),
])
def test_the_wide_variant_leads_only_on_512_bit_vector_aes(flags: str, wide: bool) -> None:
    cpuinfo = f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {flags}\n"
    assert aead.wide_vector_aes(cpuinfo) is wide
    assert aead.wide_vector_aes("Processor\t: AArch64\nFeatures\t: aes pmull\n") is False


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 32, 33, 4096, 1 << 20])
def test_same_bytes_as_public_api_and_roundtrip(cipher: str, size: int) -> None:
    plain = os.urandom(size)
    out = bytearray(size + TAG_SIZE)
    aead.new(cipher, KEY).seal_into(NONCE, memoryview(plain), b"aad", memoryview(out))
    assert bytes(out) == PUBLIC[cipher](plain, b"aad", NONCE, KEY)
    back = bytearray(size)
    aead.new(cipher, KEY).open_into(NONCE, bytes(out), b"aad", memoryview(back))
    assert back == plain


def test_the_two_ciphers_differ() -> None:
    sealed = {name: bytearray(64 + TAG_SIZE) for name in aead.built()}
    for name, out in sealed.items():
        aead.new(name, KEY).seal_into(NONCE, b"x" * 64, b"", out)
    assert len({bytes(v) for v in sealed.values()}) == len(sealed) == 3
    for a, b in [(aead.AEGIS128L, aead.AEGIS128X2), (aead.AEGIS128X2, aead.AEGIS128X4)]:
        with pytest.raises(AuthenticationFailed):
            aead.new(a, KEY).open_into(NONCE, sealed[b], b"", bytearray(64))


def test_writes_into_a_slice_of_a_larger_buffer(cipher: str) -> None:
    plain = os.urandom(1000)
    big = bytearray(2000)
    aead.new(cipher, KEY).seal_into(NONCE, plain, b"", memoryview(big)[7 : 7 + 1000 + TAG_SIZE])
    assert big[:7] == bytes(7) and big[7 + 1000 + TAG_SIZE :] == bytes(2000 - 1007 - TAG_SIZE)
    dest = bytearray(3000)
    aead.new(cipher, KEY).open_into(NONCE, memoryview(big)[7 : 7 + 1000 + TAG_SIZE], b"",
                                    memoryview(dest)[500:1500])
    assert dest[500:1500] == plain and dest[:500] == bytes(500)


@pytest.mark.parametrize("what", ["body", "tag", "aad", "nonce", "key"])
def test_any_change_fails_authentication(cipher: str, what: str) -> None:
    sealed = bytearray(64 + TAG_SIZE)
    aead.new(cipher, KEY).seal_into(NONCE, b"x" * 64, b"hdr", sealed)
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
        aead.new(cipher, key).open_into(nonce, sealed, aad, bytearray(64))


def test_size_mismatches_are_refused_before_any_crypto(cipher: str) -> None:
    a = aead.new(cipher, KEY)
    with pytest.raises(ValueError):
        a.seal_into(NONCE, b"abc", b"", bytearray(3 + TAG_SIZE - 1))
    with pytest.raises(ValueError):
        a.open_into(NONCE, bytes(TAG_SIZE + 3), b"", bytearray(4))
    with pytest.raises(ValueError):
        a.open_into(NONCE, bytes(TAG_SIZE - 1), b"", bytearray(0))
    with pytest.raises(ValueError):
        a.seal_into(NONCE[:12], b"abc", b"", bytearray(3 + TAG_SIZE))
    with pytest.raises(ValueError):
        aead.new(cipher, KEY[:8])
    with pytest.raises(BufferError):
        a.open_into(NONCE, bytes(TAG_SIZE + 3), b"", b"abc")  # read-only destination


def test_offer_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = ((aead.AEGIS128X4, aead.AEGIS128X2) if aead.wide_vector_aes()
            else (aead.AEGIS128X2, aead.AEGIS128X4))
    assert aead.supported() == aead.built() == (*fast, aead.AEGIS128L)
    monkeypatch.setenv("PEERD_CIPHERS", aead.AEGIS128L)
    assert aead.supported() == (aead.AEGIS128L,)
    monkeypatch.setenv("PEERD_CIPHERS", f"{aead.AEGIS128L},{aead.AEGIS128X2}")
    assert aead.supported() == (aead.AEGIS128X2, aead.AEGIS128L)  # this CPU's order stays
    monkeypatch.setenv("PEERD_CIPHERS", "nonsense")
    with pytest.raises(ValueError, match=r"PEERD_CIPHERS.*aegis128x., aegis128x., aegis128l"):
        aead.supported()
    with pytest.raises(ValueError, match="not available"):
        aead.new("nonsense", KEY)
    with pytest.raises(AuthError, match="no common"):
        aead.choose((aead.AEGIS128X2,), (aead.AEGIS128L,))


def test_an_install_without_pyaegis_offers_aegis128l_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a volunteer without a C compiler gets: AEGIS-128L only, and a
    clear word where AEGIS-128X2 is asked for by name."""
    monkeypatch.setattr(aead, "_aegis", None)
    assert aead.built() == aead.supported() == (aead.AEGIS128L,)
    assert aead.choose((aead.AEGIS128X4, aead.AEGIS128X2, aead.AEGIS128L),
                       aead.supported()) == aead.AEGIS128L
    with pytest.raises(ValueError, match=r"aegis128x2: not a cipher this install has.*pyaegis"):
        aead.check_offer((aead.AEGIS128X2,))
    with pytest.raises(RuntimeError, match=r"aegis128x4 needs the pyaegis package"):
        aead.Aegis128X4(KEY)
    with pytest.raises(ValueError, match="not available"):
        aead.new(aead.AEGIS128X2, KEY)
    with pytest.raises(RuntimeError, match="pip install pyaegis"):
        aead.Aegis128X2(KEY)
