"""Saving and loading the routing table's contacts in the data directory.

The file is a wire message so that reading it back goes through the same
bounded ``decode_untrusted`` door as network input: a truncated or tampered
file yields an empty table and a log line, never a crash. Writes are atomic
(temporary file, fsync, rename) so a kill during save keeps the old file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from peerd.dht.messages import WireContact
from peerd.dht.routing import Contact
from peerd.errors import ProtocolError
from peerd.identity import PeerId
from peerd.wire import Limits, decode_untrusted, encode, message

log = logging.getLogger("peerd.dht")

SNAPSHOT_VERSION = 1
_FILE_LIMITS = Limits(max_frame=8 * 1024 * 1024, max_depth=8, max_items=20_000)


@message(120)
@dataclass(frozen=True)
class RoutingSnapshot:
    version: int
    own: bytes
    contacts: tuple[WireContact, ...]


def save_contacts(path: Path, own: PeerId, contacts: list[Contact]) -> None:
    body = encode(RoutingSnapshot(SNAPSHOT_VERSION, own.raw, tuple(map(WireContact.of, contacts))))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_contacts(path: Path, own: PeerId) -> list[Contact]:
    """Contacts saved by ``save_contacts`` for identity ``own``; [] if absent or unusable."""
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("dht_routing_load_failed path=%s error=%s", path, exc)
        return []
    try:
        snap = decode_untrusted(body, _FILE_LIMITS, expect=RoutingSnapshot)
    except ProtocolError as exc:
        log.warning("dht_routing_file_corrupt path=%s error=%s", path, exc)
        return []
    if snap.version != SNAPSHOT_VERSION or snap.own != own.raw:
        # A table built around another identity has the wrong bucket layout.
        log.warning("dht_routing_file_ignored path=%s reason=identity_or_version", path)
        return []
    return [c.to_contact() for c in snap.contacts]
