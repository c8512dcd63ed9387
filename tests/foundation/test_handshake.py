"""Handshake state machines without sockets: success, wrong key, replay, relay."""

from __future__ import annotations

import pytest

from peerd import aead
from peerd.errors import AuthError, ProtocolError
from peerd.handshake import ClientHandshake, ServerHandshake
from peerd.identity import Identity, SwarmKey

A, B, M = Identity.from_seed(b"a"), Identity.from_seed(b"b"), Identity.from_seed(b"mitm")
KEY = SwarmKey(b"k" * 32)


def run(client: ClientHandshake, server: ServerHandshake):  # type: ignore[no-untyped-def]
    finish = client.on_server_hello(server.on_client_hello(client.hello()))
    accept, server_result = server.on_client_finish(finish)
    return client.on_accept(accept), server_result


def test_both_sides_learn_each_other_and_share_a_secret() -> None:
    c, s = run(ClientHandshake(A, KEY, B.public_key), ServerHandshake(B, KEY, ("198.51.100.7", 9)))
    assert c.peer_id == B.peer_id and s.peer_id == A.peer_id
    assert c.session_secret == s.session_secret and len(c.session_secret) == 32
    assert c.observed_address == ("198.51.100.7", 9)
    c2, _ = run(ClientHandshake(A, KEY, B.public_key), ServerHandshake(B, KEY, None))
    assert c2.session_secret != c.session_secret  # fresh per session


def test_each_side_learns_the_others_incarnation() -> None:
    """The process incarnation each side sends is what the other side records
    (a restarted peer is told apart from its dead process by it)."""
    ci, si = b"\x01" * 8, b"\x02" * 8
    c, s = run(ClientHandshake(A, KEY, B.public_key, incarnation=ci),
               ServerHandshake(B, KEY, None, incarnation=si))
    assert c.incarnation == si and s.incarnation == ci
    with pytest.raises(ProtocolError, match="incarnation"):
        ServerHandshake(B, KEY, None).on_client_hello(
            ClientHandshake(A, KEY, B.public_key, incarnation=b"short").hello())


X2, L = aead.AEGIS128X2, aead.AEGIS128L


@pytest.mark.parametrize(("client", "server", "chosen"), [
    ((X2, L), (X2, L), X2),  # both have pyaegis
    ((X2, L), (L,), L),  # the server has not: everyone still talks
    ((L,), (X2, L), L),
    ((L, X2), (X2, L), L),  # the client's order decides
    (("future-cipher", X2, L), (L, X2), X2),  # names it does not know are skipped
])
def test_both_sides_choose_the_same_data_cipher(
        client: tuple[str, ...], server: tuple[str, ...], chosen: str) -> None:
    c, s = run(ClientHandshake(A, KEY, B.public_key, ciphers=client),
               ServerHandshake(B, KEY, None, ciphers=server))
    assert c.data_cipher == s.data_cipher == chosen
    assert c.keying == s.keying


def test_no_common_cipher_or_a_bad_offer_is_refused_with_what_each_offers() -> None:
    with pytest.raises(AuthError, match=r"no common data cipher.*future.*aegis128l"):
        run(ClientHandshake(A, KEY, B.public_key, ciphers=("future",)),
            ServerHandshake(B, KEY, None, ciphers=(L,)))
    for bad in (("",), ("x" * 33,), ("a,b",), tuple(str(i) for i in range(9))):
        with pytest.raises(ProtocolError, match="cipher offer"):
            ServerHandshake(B, KEY, None).on_client_hello(
                ClientHandshake(A, KEY, B.public_key, ciphers=bad).hello())


def test_a_narrowed_offer_fails_the_handshake() -> None:
    """Someone in between who strips the faster cipher from the server's
    offer changes the transcript: the server's signature no longer verifies."""
    import peerd.handshake as hs
    from peerd.wire import decode_untrusted, encode

    client, server = ClientHandshake(A, KEY, B.public_key), ServerHandshake(B, KEY, None,
                                                                             ciphers=(X2, L))
    hello = decode_untrusted(server.on_client_hello(client.hello()), expect=hs.ServerHello)
    narrowed = encode(hs.ServerHello(**{**hello.__dict__, "ciphers": (L,)}))
    with pytest.raises(AuthError, match="signature"):
        client.on_server_hello(narrowed)


def test_wrong_swarm_key_rejected_by_both_sides() -> None:
    other = SwarmKey(b"o" * 32)
    client = ClientHandshake(A, other, B.public_key)
    server = ServerHandshake(B, KEY, None)
    with pytest.raises(AuthError, match="another swarm") as caught:
        client.on_server_hello(server.on_client_hello(client.hello()))
    # The dialler's own fingerprint, to compare with the other node's key file.
    assert f"fingerprint {other.fingerprint}" in str(caught.value)
    # A stranger that skips its own check still cannot pass the server.
    client = ClientHandshake(A, other, B.public_key)
    server = ServerHandshake(B, KEY, None)
    finish = client_finish_ignoring_server(client, server)
    with pytest.raises(AuthError, match="swarm key"):
        server.on_client_finish(finish)


def client_finish_ignoring_server(client: ClientHandshake, server: ServerHandshake) -> bytes:
    import peerd.handshake as hs
    from peerd.wire import decode_untrusted, encode

    hello = server.on_client_hello(client.hello())
    msg = decode_untrusted(hello)
    t = hs._transcript(B.public_key, client._hello, msg.nonce, msg.kx, msg.incarnation,
                       msg.ciphers)
    return encode(hs.ClientFinish(A.sign(b"client" + t), hs._mac(client._swarm, b"client", t)))


def test_replayed_handshake_rejected() -> None:
    client = ClientHandshake(A, KEY, B.public_key)
    hello = client.hello()
    first = ServerHandshake(B, KEY, None)
    finish = client.on_server_hello(first.on_client_hello(hello))
    first.on_client_finish(finish)
    replay = ServerHandshake(B, KEY, None)
    replay.on_client_hello(hello)  # fresh server nonce
    with pytest.raises(AuthError):
        replay.on_client_finish(finish)


def test_relayed_handshake_names_wrong_server() -> None:
    # M terminates A's TLS (A sees M's certificate key) and relays messages to B.
    client = ClientHandshake(A, KEY, M.public_key)
    server = ServerHandshake(B, KEY, None)
    with pytest.raises(AuthError, match="signature"):
        client.on_server_hello(server.on_client_hello(client.hello()))


def test_expected_peer_mismatch() -> None:
    with pytest.raises(AuthError, match="expected"):
        ClientHandshake(A, KEY, B.public_key, expected_peer=M.peer_id)


def test_out_of_order_and_garbage() -> None:
    server = ServerHandshake(B, KEY, None)
    with pytest.raises(ProtocolError):
        server.on_client_finish(b"\x00")
    with pytest.raises(ProtocolError):
        server.on_client_hello(b"\xc1garbage")
    client = ClientHandshake(A, KEY, B.public_key)
    with pytest.raises(ProtocolError):
        client.on_server_hello(client.hello())  # a ClientHello where a ServerHello belongs
