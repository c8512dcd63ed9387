"""peerd CRDT state store: signed delta CRDTs, anti-entropy sync, SQLite persistence.

Typical use inside a node (the transport is anything shaped like
``crdt.transport.SyncTransport``; ``peerd.node.Node`` already is)::

    store = Store.open(data_dir, identity, swarm_key)
    driver = SyncDriver(store, node)          # registers "crdt.sync" / "crdt.push"
    nursery.start_soon(driver.run)
    store.doc("run/abc").set("lr", 3e-4)      # durable when it returns
    store.orset("roster").add(peer_id.text)
    store.counter("steps").increment()
    async with store.subscribe("run/") as changes:
        async for change in changes: ...

Pure pieces (no I/O): ``LwwMap``, ``ORSet``, ``PNCounter``, ``HybridClock``,
``seal``/``verify_untrusted``, ``DeltaLog``, ``SyncCore``.
"""

from crdt.counter import PNCounter
from crdt.delta import Delta, DeltaRejected, Op, Rejection, seal, verify_untrusted
from crdt.documents import CounterDoc, MapDoc, SetDoc
from crdt.driver import SyncDriver
from crdt.hlc import HybridClock, Timestamp
from crdt.log import DeltaLog
from crdt.lww import LwwMap
from crdt.memnet import MemoryNetwork
from crdt.messages import DocKind
from crdt.notify import Change, Subscription
from crdt.orset import ORSet
from crdt.store import IngestResult, Store, StoreStatistics
from crdt.sync import METHOD_PUSH, METHOD_SYNC, SyncConfig, SyncCore, SyncStatistics
from crdt.transport import SyncTransport

__all__ = [
    "METHOD_PUSH",
    "METHOD_SYNC",
    "Change",
    "CounterDoc",
    "Delta",
    "DeltaLog",
    "DeltaRejected",
    "DocKind",
    "HybridClock",
    "IngestResult",
    "LwwMap",
    "MapDoc",
    "MemoryNetwork",
    "ORSet",
    "Op",
    "PNCounter",
    "Rejection",
    "SetDoc",
    "Store",
    "StoreStatistics",
    "Subscription",
    "SyncConfig",
    "SyncCore",
    "SyncDriver",
    "SyncStatistics",
    "SyncTransport",
    "Timestamp",
    "seal",
    "verify_untrusted",
]
