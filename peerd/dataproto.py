"""Sans-I/O pieces of the data plane: tokens, preamble, message heads, parts.

Everything that decides or parses lives here so it can be tested and fuzzed
without sockets; ``peerd.datachan`` and ``peerd.datalink`` are the trio drivers.
Parsers of received bytes raise only ``ProtocolError``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from peerd.errors import ProtocolError
from peerd.record import Keying

MAGIC: Final = b"PEERDDAT"
# 3: AEGIS records (the cipher is the session's, its name in the key labels:
# peerd.record); 2 was AEGIS-256, 1 AES-256-GCM.
DATA_VERSION: Final = 3
TOKEN_SIZE: Final = 32
PREAMBLE_SIZE: Final = len(MAGIC) + 1 + TOKEN_SIZE
CONFIRM_TEXT: Final = b"peerd data confirm v3"
MAX_HEADER: Final = 0xFFFF
MAX_KEY: Final = 255
MAX_PARTS: Final = 1 << 16
DEFAULT_MAX_TOKENS: Final = 65536

_HEAD_LEN: Final = struct.Struct(">H")
_PAYLOAD_LEN: Final = struct.Struct(">Q")
_PART_TAIL: Final = struct.Struct(">IIQQ")


class Kind(IntEnum):
    """Record kinds of a data channel (authenticated as part of each record header)."""

    CONFIRM = 1
    HEAD = 2
    PAYLOAD = 3
    CLOSE = 4


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class _Grant:
    peer: str
    keying: Keying
    expires: float


class TokenTable:
    """Single-use tokens that admit one data connection each.

    ``issue`` hands out a fresh random token bound to a peer and its session's
    keying; ``take`` returns and forgets it, so a token works at most once. Use
    one clock for ``now`` on both calls (the driver uses ``trio.current_time()``).
    At most ``max_tokens`` live at once: when full, expired ones are dropped,
    then the oldest issued.
    """

    def __init__(
        self,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._grants: dict[bytes, _Grant] = {}
        self._max = max_tokens
        self._entropy = entropy
        self.expired = 0

    def issue(self, peer: str, keying: Keying, ttl: float, now: float) -> bytes:
        if ttl <= 0:
            raise ValueError("token ttl must be positive")
        if len(self._grants) >= self._max:
            self.purge(now)
            while len(self._grants) >= self._max:
                del self._grants[next(iter(self._grants))]
        token = self._entropy(TOKEN_SIZE)
        if len(token) != TOKEN_SIZE or token in self._grants:
            raise RuntimeError("token entropy source failed")
        self._grants[token] = _Grant(peer, keying, now + ttl)
        return token

    def take(self, token: bytes, now: float) -> tuple[str, Keying] | None:
        grant = self._grants.pop(bytes(token), None)
        if grant is None:
            return None
        if now >= grant.expires:
            self.expired += 1
            return None
        return grant.peer, grant.keying

    def purge(self, now: float) -> int:
        """Forget expired tokens; returns how many."""
        dead = [t for t, g in self._grants.items() if now >= g.expires]
        for t in dead:
            del self._grants[t]
        self.expired += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._grants)


# ---------------------------------------------------------------- preamble


def encode_preamble(token: bytes) -> bytes:
    if len(token) != TOKEN_SIZE:
        raise ValueError(f"token must be {TOKEN_SIZE} bytes")
    return MAGIC + bytes([DATA_VERSION]) + token


def parse_preamble(data: bytes | bytearray | memoryview) -> bytes:
    """The token of a dialer's preamble; ``ProtocolError`` if it is not one."""
    if len(data) != PREAMBLE_SIZE:
        raise ProtocolError("short data preamble")
    raw = bytes(data)
    if raw[: len(MAGIC)] != MAGIC:
        raise ProtocolError("not a peerd data connection")
    if raw[len(MAGIC)] != DATA_VERSION:
        raise ProtocolError(
            f"data protocol version {raw[len(MAGIC)]} (this node speaks {DATA_VERSION})"
        )
    return raw[len(MAGIC) + 1 :]


# ---------------------------------------------------------------- message heads


def encode_head(header: bytes, payload_len: int) -> bytes:
    """Plaintext of a HEAD record: ``u16 len | header | u64 payload length``."""
    if len(header) > MAX_HEADER:
        raise ValueError(f"message header over {MAX_HEADER} bytes")
    return _HEAD_LEN.pack(len(header)) + header + _PAYLOAD_LEN.pack(payload_len)


def parse_head(plain: bytes, max_payload: int) -> tuple[bytes, int]:
    """``(header, payload length)`` of a HEAD record's plaintext."""
    if len(plain) < _HEAD_LEN.size + _PAYLOAD_LEN.size:
        raise ProtocolError("short message head")
    (hlen,) = _HEAD_LEN.unpack_from(plain)
    if len(plain) != _HEAD_LEN.size + hlen + _PAYLOAD_LEN.size:
        raise ProtocolError("message head length mismatch")
    (plen,) = _PAYLOAD_LEN.unpack_from(plain, _HEAD_LEN.size + hlen)
    if plen > max_payload:
        raise ProtocolError(f"message payload of {plen} bytes exceeds {max_payload}")
    return bytes(plain[_HEAD_LEN.size : _HEAD_LEN.size + hlen]), plen


# ---------------------------------------------------------------- striped parts


@dataclass(frozen=True)
class Part:
    """One stripe of a keyed payload, as announced in a message header."""

    key: bytes
    index: int
    count: int
    offset: int
    total: int


def part_bounds(index: int, count: int, total: int) -> tuple[int, int]:
    """``(offset, length)`` of stripe ``index`` of ``count`` over ``total`` bytes."""
    start = total * index // count
    return start, total * (index + 1) // count - start


def choose_part_count(total: int, channels: int, part_size: int, min_part: int) -> int:
    """How many stripes to cut: enough to keep every channel busy and no stripe
    larger than ``part_size``, but none smaller than ``min_part`` (a tiny stripe
    costs more in per-message overhead than the parallelism wins)."""
    by_size = -(-total // part_size)
    by_min = max(1, total // max(1, min_part))
    return max(1, min(MAX_PARTS, max(by_size, min(channels, by_min))))


def encode_part(part: Part) -> bytes:
    if not 1 <= len(part.key) <= MAX_KEY:
        raise ValueError(f"key must be 1..{MAX_KEY} bytes")
    return bytes([len(part.key)]) + part.key + _PART_TAIL.pack(
        part.index, part.count, part.offset, part.total
    )


def parse_part(header: bytes, payload_len: int, max_total: int) -> Part:
    """Validate a stripe header against the payload that follows it."""
    if not header or len(header) != 1 + header[0] + _PART_TAIL.size or header[0] == 0:
        raise ProtocolError("malformed part header")
    klen = header[0]
    index, count, offset, total = _PART_TAIL.unpack_from(header, 1 + klen)
    if not 1 <= count <= MAX_PARTS or index >= count:
        raise ProtocolError(f"part {index} of {count} out of range")
    if total > max_total:
        raise ProtocolError(f"payload of {total} bytes exceeds {max_total}")
    if (offset, payload_len) != part_bounds(index, count, total):
        raise ProtocolError("part offset/length do not match its index")
    return Part(bytes(header[1 : 1 + klen]), index, count, offset, total)


class PartTracker:
    """Which stripes of one key have arrived; refuses duplicates and mismatches."""

    def __init__(self, first: Part) -> None:
        self.key = first.key
        self.count = first.count
        self.total = first.total
        self._seen = bytearray(first.count)
        self.received = 0

    def begin(self, part: Part) -> None:
        """Claim ``part``'s slot as its head arrives, so a duplicate on another
        channel is refused before its bytes are written anywhere."""
        if part.key != self.key or part.count != self.count or part.total != self.total:
            raise ProtocolError("parts of one key disagree on count or size")
        if self._seen[part.index]:
            raise ProtocolError(f"duplicate part {part.index} of key {part.key!r}")
        self._seen[part.index] = 1

    def finish(self) -> bool:
        """One begun stripe is fully written; True once every stripe is."""
        self.received += 1
        return self.received == self.count
