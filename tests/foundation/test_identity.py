"""Identity, peer ids and swarm keys (pure, plus file permissions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peerd.errors import ConfigError
from peerd.identity import Identity, PeerId, SwarmKey, verify_signature


def test_peer_id_text_roundtrip_and_validation() -> None:
    ident = Identity.generate()
    text = ident.peer_id.text
    assert PeerId.parse(text) == ident.peer_id
    assert ident.peer_id == PeerId.from_public_key(ident.public_key)
    for bad in ["", "x" + text[1:], text[:-1], text + "a", text[:-1] + "1", 42]:
        with pytest.raises(ValueError):
            PeerId.parse(bad)  # type: ignore[arg-type]


def test_signatures_bind_key_and_message() -> None:
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"msg")
    assert verify_signature(a.public_key, b"msg", sig)
    assert not verify_signature(b.public_key, b"msg", sig)
    assert not verify_signature(a.public_key, b"msh", sig)
    assert not verify_signature(a.public_key, b"msg", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_signature(b"short", b"msg", sig)


def test_identity_save_load_mode_and_no_overwrite(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "id.key"
    ident.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Identity.load(path).peer_id == ident.peer_id
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        Identity.generate().save(path)
    assert Identity.load(path).peer_id == ident.peer_id


def test_world_readable_key_refused_with_fix(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize("text", ["", "peerd-identity-v1\nzz\n", "peerd-swarm-key-v1\n" + "00" * 32,
                                  "peerd-identity-v1\n" + "00" * 31 + "\n"])
def test_malformed_identity_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "id.key"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError):
        Identity.load(path)


def test_missing_identity_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="peerd keygen"):
        Identity.load(tmp_path / "nope")


def test_swarm_key_roundtrip(tmp_path: Path) -> None:
    key = SwarmKey.generate()
    path = tmp_path / "swarm.key"
    key.save(path)
    assert SwarmKey.load(path) == key
    assert key.fingerprint != SwarmKey.generate().fingerprint
    assert key.raw.hex() not in repr(key)
    with pytest.raises(ConfigError):
        key.save(path)
    path2 = tmp_path / "bad.key"
    path2.write_text("peerd-swarm-key-v1\nnothex\n")
    os.chmod(path2, 0o600)
    with pytest.raises(ConfigError, match="hex"):
        SwarmKey.load(path2)
