"""TLS certificates made from a node's Ed25519 identity, and reading the peer's.

The QUIC server presents a self-signed certificate whose key *is* its peer
identity key, so the TLS handshake already proves the server's identity; our
own handshake (``peerd.handshake``) then binds the client's proof to that key.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from peerd.errors import AuthError
from peerd.identity import Identity


def private_key_of(identity: Identity) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(identity.seed)


def self_signed_certificate(identity: Identity) -> x509.Certificate:
    """A long-lived self-signed certificate for ``identity`` (validity is not
    checked by peers: trust comes from the key, not from dates)."""
    key = private_key_of(identity)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id.text)])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(identity.peer_id.raw[:16], "big") >> 1 or 1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365 * 50))
        .sign(key, None)
    )


def ed25519_key_of_certificate(cert: Any) -> bytes:
    """The raw 32-byte Ed25519 key of a peer certificate; ``AuthError`` otherwise."""
    if cert is None:
        raise AuthError("peer presented no certificate")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise AuthError("peer certificate key is not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_certificate_key(quic: Any) -> bytes:
    """The server certificate key seen by a client ``QuicConnection``.

    aioquic keeps the peer certificate in a private attribute of its TLS
    context; this is the only place peerd reads it (a test pins the behaviour
    so an aioquic upgrade that moves it fails loudly).
    """
    tls = getattr(quic, "tls", None)
    cert = getattr(tls, "_peer_certificate", None)
    return ed25519_key_of_certificate(cert)
