"""Kademlia DHT: signed records with expiry and republish, peer address lookup.

Sans-I/O cores: ``routing`` (k-buckets), ``lookup`` (iterative lookups),
``records`` and ``storage`` (signed records and what a node keeps for others),
``service`` (answering requests). The trio driver is ``node.Dht``; it talks to
peers through the small ``transport.RpcClient`` interface, implemented by the
node's QUIC RPC layer and, for simulations, by ``memnet.MemNet``.
"""

from peerd.dht.config import DhtConfig
from peerd.dht.lookup import LookupResult
from peerd.dht.node import Dht, DhtStatistics
from peerd.dht.records import (
    NODE_RECORD_SUBKEY,
    Record,
    RecordLimits,
    Reject,
    owned_subkey,
    split_subkey,
)
from peerd.dht.routing import Contact
from peerd.dht.transport import Handler, PeerRef, RpcClient

__all__ = [
    "NODE_RECORD_SUBKEY",
    "Contact",
    "Dht",
    "DhtConfig",
    "DhtStatistics",
    "Handler",
    "LookupResult",
    "PeerRef",
    "Record",
    "RecordLimits",
    "Reject",
    "RpcClient",
    "owned_subkey",
    "split_subkey",
]
