"""Mutual authentication and swarm admission (sans-I/O).

Runs on the first QUIC stream after TLS completes. The server's TLS
certificate key is its identity key, so the client already knows whom it
reached. Then::

    C -> S  ClientHello(version, client key, nonce_c, x25519_c, incarnation_c, ciphers_c)
    S -> C  ServerHello(nonce_s, x25519_s, observed address, sig_s(T), mac_s(T), incarnation_s,
                        ciphers_s)
    C -> S  ClientFinish(sig_c(T), mac_c(T))
    S -> C  Accept()

with transcript ``T = sha256(label | server cert key | client key | nonces |
x25519 shares | incarnations | cipher offers)``. The client's signature
names the server's *certificate* key:
a third party relaying the exchange presents its own certificate, so the
relayed signature names the wrong server and is refused. ``mac`` is
HMAC-SHA256 with the swarm key (compared in constant time) and proves
membership. Fresh nonces on both sides make a replayed handshake fail. The
X25519 exchange yields the session secret that keys the data plane, and
the two cipher offers (in the transcript, so nobody in between can narrow
them) decide its record cipher (``peerd.aead.choose``: the first of the
client's that the server offers).

An *incarnation* is a random value a node draws once per process: the same
identity after a crash and restart sends a new one, so a peer still holding a
session to the dead process knows to drop it at once instead of preferring it
over the new process's session by the duplicate tie rule (peerd/node.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

import nacl.bindings
import nacl.public
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peerd import aead
from peerd.errors import AuthError, ProtocolError
from peerd.identity import Identity, PeerId, SwarmKey, verify_signature
from peerd.record import Keying
from peerd.wire import decode_untrusted, encode, message

HANDSHAKE_VERSION = 3
NONCE_BYTES = 32
INCARNATION_BYTES = 8
_LABEL = b"peerd-handshake-v3"

Random = Callable[[int], bytes]


@message(1)
@dataclass(frozen=True)
class ClientHello:
    version: int
    public_key: bytes
    nonce: bytes
    kx: bytes
    incarnation: bytes
    ciphers: tuple[str, ...]  # data-plane record ciphers, preferred first


@message(2)
@dataclass(frozen=True)
class ServerHello:
    version: int
    nonce: bytes
    kx: bytes
    observed_host: str
    observed_port: int
    signature: bytes
    membership: bytes
    incarnation: bytes
    ciphers: tuple[str, ...]


@message(3)
@dataclass(frozen=True)
class ClientFinish:
    signature: bytes
    membership: bytes


@message(4)
@dataclass(frozen=True)
class Accept:
    version: int


@dataclass(frozen=True)
class HandshakeResult:
    """What an authenticated connection knows about its peer."""

    peer_id: PeerId
    public_key: bytes
    session_secret: bytes
    observed_address: tuple[str, int] | None  # how the peer saw us (client side only)
    incarnation: bytes  # the peer's process (see the module docstring)
    data_cipher: str = aead.AEGIS128L  # the data plane's record cipher

    @property
    def keying(self) -> Keying:
        return Keying(self.session_secret, self.data_cipher)


def _transcript(server_key: bytes, hello: ClientHello, nonce_s: bytes, kx_s: bytes,
                incarnation_s: bytes, ciphers_s: tuple[str, ...]) -> bytes:
    h = hashlib.sha256(_LABEL)
    for part in (server_key, hello.public_key, hello.nonce, nonce_s, hello.kx, kx_s,
                 hello.incarnation, incarnation_s, _offer_bytes(hello.ciphers),
                 _offer_bytes(ciphers_s)):
        h.update(len(part).to_bytes(2, "big"))
        h.update(part)
    return h.digest()


def _offer_bytes(offer: tuple[str, ...]) -> bytes:
    return ",".join(offer).encode()


def _check_offer(offer: object) -> tuple[str, ...]:
    if not isinstance(offer, tuple) or not 0 < len(offer) <= aead.MAX_OFFER or not all(
            isinstance(n, str) and 0 < len(n) <= aead.MAX_NAME and "," not in n
            for n in offer):
        raise ProtocolError("handshake cipher offer is malformed")
    return offer


def _mac(swarm_key: SwarmKey, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(swarm_key.raw, role + transcript, hashlib.sha256).digest()


def _session_secret(shared: bytes, transcript: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=transcript, info=b"peerd session v1")
    return hkdf.derive(shared)


def _check_lengths(nonce: bytes, kx: bytes, incarnation: bytes) -> None:
    if len(nonce) != NONCE_BYTES or len(kx) != 32 or len(incarnation) != INCARNATION_BYTES:
        raise ProtocolError("handshake nonce, key share or incarnation has the wrong length")


def new_incarnation() -> bytes:
    return os.urandom(INCARNATION_BYTES)


def _shared(private: nacl.public.PrivateKey, kx: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_scalarmult(bytes(private), kx)
    except Exception as exc:  # low-order points are refused by libsodium
        raise AuthError("invalid key share") from exc


class ClientHandshake:
    """Client side; ``server_key`` is the Ed25519 key from the server's certificate."""

    def __init__(
        self,
        identity: Identity,
        swarm_key: SwarmKey,
        server_key: bytes,
        expected_peer: PeerId | None = None,
        rand: Random = os.urandom,
        incarnation: bytes | None = None,
        ciphers: tuple[str, ...] | None = None,
    ) -> None:
        self._identity = identity
        self._swarm = swarm_key
        self._server_key = server_key
        self._server_id = PeerId.from_public_key(server_key)
        if expected_peer is not None and expected_peer != self._server_id:
            raise AuthError(f"reached {self._server_id} but expected {expected_peer}")
        self._kx = nacl.public.PrivateKey(rand(32))
        self._hello = ClientHello(HANDSHAKE_VERSION, identity.public_key, rand(NONCE_BYTES),
                                  bytes(self._kx.public_key), incarnation or new_incarnation(),
                                  ciphers or aead.supported())
        self._pending: HandshakeResult | None = None

    def hello(self) -> bytes:
        return encode(self._hello)

    def on_server_hello(self, body: bytes) -> bytes:
        msg = decode_untrusted(body, expect=ServerHello)
        if msg.version != HANDSHAKE_VERSION:
            raise AuthError(f"peer speaks handshake v{msg.version}, we speak v{HANDSHAKE_VERSION}")
        _check_lengths(msg.nonce, msg.kx, msg.incarnation)
        _check_offer(msg.ciphers)
        t = _transcript(self._server_key, self._hello, msg.nonce, msg.kx, msg.incarnation,
                        msg.ciphers)
        if not verify_signature(self._server_key, b"server" + t, msg.signature):
            raise AuthError("server signature does not verify")
        if not hmac.compare_digest(msg.membership, _mac(self._swarm, b"server", t)):
            raise AuthError(
                "server does not hold our swarm key: it is a node of another swarm. Both "
                "need the same swarm key file (this node's has fingerprint "
                f"{self._swarm.fingerprint}; `peerd swarm-key show FILE` prints a file's)")
        secret = _session_secret(_shared(self._kx, msg.kx), t)
        observed = (msg.observed_host, msg.observed_port) if msg.observed_host else None
        self._pending = HandshakeResult(self._server_id, self._server_key, secret, observed,
                                        msg.incarnation, aead.choose(self._hello.ciphers,
                                                                     msg.ciphers))
        finish = ClientFinish(self._identity.sign(b"client" + t), _mac(self._swarm, b"client", t))
        return encode(finish)

    def on_accept(self, body: bytes) -> HandshakeResult:
        decode_untrusted(body, expect=Accept)
        if self._pending is None:
            raise ProtocolError("accept before server hello")
        return self._pending


class ServerHandshake:
    """Server side; ``observed`` is the client's address as the server saw it."""

    def __init__(
        self,
        identity: Identity,
        swarm_key: SwarmKey,
        observed: tuple[str, int] | None,
        rand: Random = os.urandom,
        incarnation: bytes | None = None,
        ciphers: tuple[str, ...] | None = None,
    ) -> None:
        self._identity = identity
        self._swarm = swarm_key
        self._observed = observed
        self._ciphers = ciphers or aead.supported()
        self._cipher = ""
        self._rand = rand
        self._incarnation = incarnation or new_incarnation()
        self._hello: ClientHello | None = None
        self._transcript = b""
        self._shared = b""

    def on_client_hello(self, body: bytes) -> bytes:
        if self._hello is not None:
            raise ProtocolError("second client hello")
        hello = decode_untrusted(body, expect=ClientHello)
        if hello.version != HANDSHAKE_VERSION:
            raise AuthError(
                f"peer speaks handshake v{hello.version}, we speak v{HANDSHAKE_VERSION}")
        _check_lengths(hello.nonce, hello.kx, hello.incarnation)
        if len(hello.public_key) != 32:
            raise ProtocolError("client key has the wrong length")
        self._cipher = aead.choose(_check_offer(hello.ciphers), self._ciphers)
        kx = nacl.public.PrivateKey(self._rand(32))
        nonce = self._rand(NONCE_BYTES)
        kx_pub = bytes(kx.public_key)
        t = _transcript(self._identity.public_key, hello, nonce, kx_pub, self._incarnation,
                        self._ciphers)
        self._hello, self._transcript = hello, t
        self._shared = _shared(kx, hello.kx)
        host, port = self._observed or ("", 0)
        reply = ServerHello(HANDSHAKE_VERSION, nonce, kx_pub, host, port,
                            self._identity.sign(b"server" + t), _mac(self._swarm, b"server", t),
                            self._incarnation, self._ciphers)
        return encode(reply)

    def on_client_finish(self, body: bytes) -> tuple[bytes, HandshakeResult]:
        if self._hello is None:
            raise ProtocolError("client finish before client hello")
        msg = decode_untrusted(body, expect=ClientFinish)
        t = self._transcript
        # Membership first: a stranger learns nothing from which check failed.
        if not hmac.compare_digest(msg.membership, _mac(self._swarm, b"client", t)):
            raise AuthError("client does not hold our swarm key")
        if not verify_signature(self._hello.public_key, b"client" + t, msg.signature):
            raise AuthError("client signature does not verify (replayed or relayed handshake)")
        key = self._hello.public_key
        result = HandshakeResult(PeerId.from_public_key(key), key,
                                 _session_secret(self._shared, t), None, self._hello.incarnation,
                                 self._cipher)
        return encode(Accept(HANDSHAKE_VERSION)), result
