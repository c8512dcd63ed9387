"""What a node knows of NAT situations: its own (published in the DHT) and its peers'.

``PeerInfos`` answers ``peerd.nat.info`` requests with our ``NatInfo``,
remembers what peers told us (directly or through a rendezvous), falls back to
the DHT for peers nobody connected knows, and republishes our info (and the
public addresses it implies) whenever it changes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from nat.endpoint import Endpoint, NatType
from peerd.errors import PeerdError
from peerd.identity import PeerId
from peerd.log import event
from peerd.natstate import UNKNOWN_INFO, NatInfo
from peerd.wire import decode_untrusted, encode

if TYPE_CHECKING:
    from peerd.node import Node

log = logging.getLogger("peerd.traversal")

INFO_METHOD = "peerd.nat.info"
INFO_TIMEOUT = 5.0
PUBLISH_DEBOUNCE = 1.0
PUBLISH_TIMEOUT = 30.0
NAT_RECORD_TTL = 600.0


class PeerInfos:
    """Our NAT info and the ones peers gave us (built by ``Traversal``)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._known: dict[PeerId, NatInfo] = {}
        self._changed = trio.Event()
        self._published: NatInfo | None = None
        self.subkey = node.peer_id.raw + b"/nat"
        node.register(INFO_METHOD, self._handle_info)

    def local(self) -> NatInfo:
        return self._node.nat.info(trio.current_time())

    def remember(self, peer: PeerId, info: NatInfo) -> None:
        self._known[peer] = info

    def changed(self) -> None:
        """Our network situation may have changed: republish (debounced)."""
        self._changed.set()

    async def of(self, peer: PeerId) -> NatInfo:
        """``peer``'s NAT info, asked from the peer itself when not yet known."""
        info = self._known.get(peer)
        if info is not None:
            return info
        try:
            reply = await self._node.call(peer, INFO_METHOD, b"", INFO_TIMEOUT)
            info = decode_untrusted(reply, expect=NatInfo)
        except PeerdError:
            return UNKNOWN_INFO
        self._known[peer] = info
        return info

    async def from_dht(self, peer: PeerId) -> NatInfo:
        """``peer``'s published info, or at least its published addresses."""
        dht = self._node.dht
        with trio.move_on_after(INFO_TIMEOUT):
            try:
                raw = (await dht.get(peer.raw)).get(peer.raw + b"/nat")
                if isinstance(raw, bytes):
                    return decode_untrusted(raw, expect=NatInfo)
                addresses = await dht.find_peer(peer) or ()
            except PeerdError:
                addresses = ()
            public = tuple(e for a in addresses if (e := endpoint_of(a)) is not None)
            return NatInfo(1, NatType.UNKNOWN, None, public[:8], (), 0, False)
        return UNKNOWN_INFO

    async def _handle_info(self, peer: PeerId, payload: bytes) -> bytes:
        return encode(self.local())

    async def run(self) -> None:
        """Publish our NAT info (and public addresses) in the DHT when it changes."""
        node = self._node
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            await trio.sleep(PUBLISH_DEBOUNCE)
            info = self.local()
            if info == self._published or info.nat_type is NatType.UNKNOWN:
                continue
            self._published = info
            listen = node.listen_addresses
            public = [str(e) for e in info.public if str(e) not in listen]
            node.dht.set_addresses([*listen, *public][:8])
            with trio.move_on_after(PUBLISH_TIMEOUT):
                try:
                    await node.dht.put(node.peer_id.raw, encode(info), NAT_RECORD_TTL,
                                       self.subkey)
                    await node.dht.publisher.publish_node_record()
                except (PeerdError, ValueError) as exc:
                    event(log, "traversal.publish_failed", error=exc)
            event(log, "traversal.published", nat=info.nat_type.name.lower(),
                  public=public)


def endpoint_of(text: str) -> Endpoint | None:
    """``host:port`` (IPv6 hosts in brackets) as an ``Endpoint``, or None."""
    host, _, port = text.rpartition(":")
    try:
        return Endpoint(host.strip("[]"), int(port))
    except ValueError:
        return None
