"""Node identity (Ed25519) and the swarm key.

A node's identity is an Ed25519 signing key stored in a file only its owner
can read. Its peer id is the SHA-256 of the public key; the short text form is
lowercase base32 without padding behind a ``p`` prefix, and it parses back with
validation. The swarm key is 32 random bytes shared by every member of one
swarm; holding it is the membership credential.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from peerd.errors import AuthError, ConfigError

IDENTITY_HEADER = "peerd-identity-v1"
SWARM_KEY_HEADER = "peerd-swarm-key-v1"
PEER_ID_PREFIX = "p"
PEER_ID_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True, order=True)
class PeerId:
    """SHA-256 of a node's Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != PEER_ID_BYTES:
            raise ValueError("a peer id is exactly 32 bytes")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        return cls(hashlib.sha256(public_key).digest())

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse the text form; raises ``ValueError`` naming what is wrong."""
        if not isinstance(text, str) or not text.startswith(PEER_ID_PREFIX):
            raise ValueError(f"peer id must start with {PEER_ID_PREFIX!r}: {text!r}")
        body = text[len(PEER_ID_PREFIX) :].upper()
        if len(body) != 52:
            raise ValueError(f"peer id must have 53 characters, got {len(text)}: {text!r}")
        try:
            raw = base64.b32decode(body + "====")
        except ValueError as exc:  # binascii.Error is a ValueError
            raise ValueError(f"peer id is not valid base32: {text!r}") from exc
        return cls(raw)

    @functools.cached_property
    def text(self) -> str:
        # Cached: the data path names peers by this text per message.
        return PEER_ID_PREFIX + base64.b32encode(self.raw).decode().rstrip("=").lower()

    @property
    def short(self) -> str:
        """A prefix for logs and tables; not unique, never parse it."""
        return self.text[:12]

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"PeerId({self.short}…)"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False
    return True


class Identity:
    """An Ed25519 keypair; ``peer_id`` is derived from the public key."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity, for tests and simulations."""
        return cls(nacl.signing.SigningKey(hashlib.sha256(seed).digest()))

    @property
    def seed(self) -> bytes:
        return bytes(self._key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._key.sign(message).signature)

    def save(self, path: Path) -> None:
        """Write to ``path`` with mode 0600; refuses to overwrite."""
        text = f"{IDENTITY_HEADER}\n{self.seed.hex()}\n"
        _write_secret(path, text, what="identity")

    @classmethod
    def load(cls, path: Path) -> Identity:
        text = _read_secret(path, what="identity", fix="peerd keygen --out PATH")
        seed = _parse_hex_file(text, IDENTITY_HEADER, path, "identity")
        return cls(nacl.signing.SigningKey(seed))

    def __repr__(self) -> str:
        return f"Identity({self.peer_id.short}…)"


@dataclass(frozen=True)
class SwarmKey:
    """The 32-byte membership secret of one swarm."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise ValueError("a swarm key is exactly 32 bytes")

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(os.urandom(32))

    @property
    def fingerprint(self) -> str:
        """Public, non-secret short name of the swarm (safe to log)."""
        return hashlib.sha256(b"peerd-swarm-fingerprint" + self.raw).hexdigest()[:16]

    def save(self, path: Path) -> None:
        _write_secret(path, f"{SWARM_KEY_HEADER}\n{self.raw.hex()}\n", what="swarm key")

    @classmethod
    def load(cls, path: Path) -> SwarmKey:
        text = _read_secret(path, what="swarm key", fix="peerd swarm-key new --out PATH")
        return cls(_parse_hex_file(text, SWARM_KEY_HEADER, path, "swarm key"))

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint})"


def _write_secret(path: Path, text: str, what: str) -> None:
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} already exists; refusing to overwrite an existing {what} "
                          "(choose another --out path or delete the old file yourself)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL closes the race between the exists() check and the write.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _read_secret(path: Path, what: str, fix: str) -> str:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist; create one with `{fix}`") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} file {path} is readable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}`"
        )
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc


def _parse_hex_file(text: str, header: str, path: Path, what: str) -> bytes:
    lines = text.strip().splitlines()
    if len(lines) != 2 or lines[0].strip() != header:
        raise ConfigError(f"{path} is not a {what} file (expected first line {header!r})")
    try:
        raw = bytes.fromhex(lines[1].strip())
    except ValueError:
        raise ConfigError(f"{path}: {what} is not valid hex") from None
    if len(raw) != 32:
        raise ConfigError(f"{path}: {what} must be 32 bytes, found {len(raw)}")
    return raw


__all__ = ["AuthError", "Identity", "PeerId", "SwarmKey", "verify_signature"]
