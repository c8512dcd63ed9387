"""What a CRDT may hold: msgpack-able values, normalised once at write time.

A value is stored exactly as a remote replica will decode it (tuples become
lists, only ``str`` map keys), so the local replica and every remote replica
hold identical data. OR-set elements are restricted to hashable scalars with
one unambiguous equality (``str``, ``int``, ``bytes``; not ``bool``, which
Python would confuse with 0 and 1).
"""

from __future__ import annotations

from typing import Any

import msgpack

from peerd.errors import ProtocolError

MAX_VALUE_BYTES = 64 * 1024
MAX_KEY_CHARS = 1024
MAX_NAME_CHARS = 256

Element = str | int | bytes


def pack(value: Any) -> bytes:
    """Deterministic msgpack bytes of a canonical value (used for tie-breaks)."""
    return msgpack.packb(value, use_bin_type=True)


def canonical(value: Any) -> Any:
    """``value`` as every replica will see it; ``ValueError`` if unsupported."""
    try:
        packed = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"value cannot be stored in a CRDT: {exc}") from None
    if len(packed) > MAX_VALUE_BYTES:
        raise ValueError(f"value of {len(packed)} bytes exceeds {MAX_VALUE_BYTES}")
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except ValueError as exc:
        raise ValueError(f"value cannot be stored in a CRDT: {exc}") from None


def check_key(key: Any) -> str:
    if type(key) is not str or not 0 < len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"a key is a non-empty str of at most {MAX_KEY_CHARS} characters")
    return key


def check_name(name: Any) -> str:
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ValueError(
            f"a document name is a non-empty str of at most {MAX_NAME_CHARS} characters"
        )
    return name


def check_element(element: Any) -> Element:
    if type(element) not in (str, int, bytes):
        raise ValueError("an OR-set element is a str, int or bytes")
    if type(element) is int and not -(2**63) <= element < 2**64:
        raise ValueError("an OR-set int element must fit in 64 bits")
    if len(pack(element)) > MAX_VALUE_BYTES:
        raise ValueError("OR-set element too large")
    return element


def element_sort_key(element: Element) -> tuple[int, Any]:
    """Total order over mixed element types, for deterministic encodings."""
    return (("int", "str", "bytes").index(type(element).__name__), element)


def untrusted(check: Any, value: Any) -> Any:
    """Run a ``check_*`` on network input, turning its ``ValueError`` into ``ProtocolError``."""
    try:
        return check(value)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


__all__ = [
    "MAX_VALUE_BYTES",
    "Element",
    "canonical",
    "check_element",
    "check_key",
    "check_name",
    "element_sort_key",
    "pack",
    "untrusted",
]
