"""Wire format: length-prefixed msgpack frames carrying typed, versioned messages.

Every message is a frozen dataclass registered with ``@message(type_id)``; its
schema is its type hints (``int``, ``float``, ``bool``, ``str``, ``bytes``,
``tuple[T, ...]``, ``dict[str, T]``, ``T | None``, other registered messages,
and ``IntEnum`` subclasses). A frame is::

    u32 big-endian body length | msgpack [WIRE_VERSION, type_id, field0, field1, ...]

``decode_untrusted`` is the one door for bytes from the network: it enforces
hard limits (frame size, nesting depth, element counts, string/bin lengths)
and raises only ``ProtocolError``. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from peerd.errors import ProtocolError

WIRE_VERSION = 1
FRAME_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class Limits:
    """Hard bounds applied to every untrusted frame."""

    max_frame: int = 4 * 1024 * 1024
    max_depth: int = 16
    max_items: int = 100_000
    max_str: int = 64 * 1024
    max_bin: int = 4 * 1024 * 1024


DEFAULT_LIMITS = Limits()

M = TypeVar("M")

_BY_ID: dict[int, type] = {}
_ID_OF: dict[type, int] = {}
_DECODERS: dict[type, list[tuple[str, Callable[[Any, int], Any]]]] = {}


def message(type_id: int) -> Callable[[type[M]], type[M]]:
    """Register a frozen dataclass as a wire message with a unique ``type_id``."""

    def register(cls: type[M]) -> type[M]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        if type_id in _BY_ID and _BY_ID[type_id] is not cls:
            raise TypeError(f"type id {type_id} already used by {_BY_ID[type_id].__name__}")
        _BY_ID[type_id] = cls
        _ID_OF[cls] = type_id
        return cls

    return register


def registered_types() -> dict[int, type]:
    return dict(_BY_ID)


# ---------------------------------------------------------------- encoding


def _to_plain(value: Any) -> Any:
    if type(value) in _ID_OF:
        return [_to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def encode(msg: Any) -> bytes:
    """The msgpack body of ``msg`` (no length prefix)."""
    type_id = _ID_OF.get(type(msg))
    if type_id is None:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    body = [WIRE_VERSION, type_id, *_to_plain(msg)]
    return msgpack.packb(body, use_bin_type=True)


def encode_frame(msg: Any) -> bytes:
    body = encode(msg)
    return FRAME_HEADER.pack(len(body)) + body


# ---------------------------------------------------------------- decoding


def _fail(what: str) -> typing.NoReturn:
    raise ProtocolError(what)


def _decoder_for(tp: Any) -> Callable[[Any, int], Any]:
    """Build a validator/converter for one annotated type."""
    origin = typing.get_origin(tp)
    if tp is int:
        return lambda v, d: v if type(v) is int else _fail(f"expected int, got {type(v).__name__}")
    if tp is float:
        def dec_float(v: Any, d: int) -> float:
            if type(v) is float or type(v) is int:
                return float(v)
            _fail(f"expected float, got {type(v).__name__}")
        return dec_float
    if tp is bool:
        return lambda v, d: v if type(v) is bool else _fail("expected bool")
    if tp is str:
        return lambda v, d: v if type(v) is str else _fail("expected str")
    if tp is bytes:
        return lambda v, d: v if type(v) is bytes else _fail("expected bytes")
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        def dec_enum(v: Any, d: int) -> Any:
            if type(v) is not int:
                _fail(f"expected {tp.__name__}")
            try:
                return tp(v)
            except ValueError:
                _fail(f"unknown {tp.__name__} value {v}")
        return dec_enum
    if isinstance(tp, type) and tp in _ID_OF:
        return lambda v, d: _decode_fields(tp, v, d + 1)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _decoder_for(args[0])

            def dec_seq(v: Any, d: int) -> tuple[Any, ...]:
                if type(v) is not list:
                    _fail("expected array")
                return tuple(inner(x, d + 1) for x in v)
            return dec_seq
        inners = [_decoder_for(a) for a in args]

        def dec_fixed(v: Any, d: int) -> tuple[Any, ...]:
            if type(v) is not list or len(v) != len(inners):
                _fail(f"expected array of {len(inners)}")
            return tuple(f(x, d + 1) for f, x in zip(inners, v, strict=True))
        return dec_fixed
    if origin is dict:
        kt, vt = typing.get_args(tp)
        kdec, vdec = _decoder_for(kt), _decoder_for(vt)

        def dec_map(v: Any, d: int) -> dict[Any, Any]:
            if type(v) is not dict:
                _fail("expected map")
            return {kdec(k, d + 1): vdec(x, d + 1) for k, x in v.items()}
        return dec_map
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and len(args) == 2:
            inner = _decoder_for(non_none[0])
            return lambda v, d: None if v is None else inner(v, d)
    if tp is Any:
        return lambda v, d: v
    raise TypeError(f"unsupported wire type {tp!r}")


def _field_decoders(cls: type) -> list[tuple[str, Callable[[Any, int], Any]]]:
    decs = _DECODERS.get(cls)
    if decs is None:
        hints = typing.get_type_hints(cls)
        decs = [(f.name, _decoder_for(hints[f.name])) for f in dataclasses.fields(cls)]
        _DECODERS[cls] = decs
    return decs


def _decode_fields(cls: type[M], values: Any, depth: int) -> M:
    decs = _field_decoders(cls)
    if type(values) is not list or len(values) != len(decs):
        _fail(f"{cls.__name__}: expected {len(decs)} fields")
    kwargs = {name: dec(v, depth) for (name, dec), v in zip(decs, values, strict=True)}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # __post_init__ validation of a message is part of the wire contract.
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


def _check_depth(obj: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        v, d = stack.pop()
        if d > max_depth:
            _fail(f"nesting deeper than {max_depth}")
        if type(v) is list:
            stack.extend((x, d + 1) for x in v)
        elif type(v) is dict:
            stack.extend((x, d + 1) for x in v.values())
            stack.extend((k, d + 1) for k in v)


def unpack_untrusted(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Bounded msgpack decode of untrusted bytes into plain Python values."""
    if len(body) > limits.max_frame:
        _fail(f"frame of {len(body)} bytes exceeds limit {limits.max_frame}")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types; all mean "garbage"
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}") from None
    _check_depth(obj, limits.max_depth)
    return obj


def decode_untrusted(
    body: bytes, limits: Limits = DEFAULT_LIMITS, expect: type[M] | None = None
) -> Any:
    """Decode one message body from the network; raises only ``ProtocolError``."""
    obj = unpack_untrusted(body, limits)
    if type(obj) is not list or len(obj) < 2:
        _fail("message is not [version, type, ...]")
    version, type_id = obj[0], obj[1]
    if version != WIRE_VERSION or type(version) is not int:
        _fail(f"unsupported wire version {version!r} (this node speaks {WIRE_VERSION})")
    cls = _BY_ID.get(type_id) if type(type_id) is int else None
    if cls is None:
        _fail(f"unknown message type {type_id!r}")
    if expect is not None and cls is not expect:
        _fail(f"expected {expect.__name__}, got {cls.__name__}")
    try:
        return _decode_fields(cls, obj[2:], 1)
    except RecursionError:
        _fail("nesting too deep")


class FrameDecoder:
    """Incremental splitter of a byte stream into bounded frames (sans-I/O)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every complete frame body. Raises ``ProtocolError``
        as soon as a header announces a frame over the limit."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(self._buf)
            if n > self._limits.max_frame:
                _fail(f"frame of {n} bytes exceeds limit {self._limits.max_frame}")
            end = FRAME_HEADER.size + n
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[FRAME_HEADER.size : end]))
            del self._buf[:end]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
