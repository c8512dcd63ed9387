"""Control-socket messages between a local client and its daemon (type ids 400-499).

Frames are ``peerd.wire`` frames (u32 length + msgpack). Every request carries
a client-chosen ``req_id``; the daemon answers each request exactly once, with
its reply type or ``CtlError``, in any order (requests run concurrently).

Tensors never travel in these messages: a ``TensorRef`` names a region of a
shared-memory segment that was registered on the same connection with
``RegisterSegment`` (its memfd travels as SCM_RIGHTS ancillary data of that
frame). Daemon-made results (all-gather, recv) come back in segments the
daemon creates and hands over the same way (``SegmentGift``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peerd.wire import Limits, message

# 2: AllGatherRequest carries retry; 3: AllReduceRequest out; 4: StatusReply swarm,
# TensorRef dtype BF16_DTYPE; 5: UpdateViewRequest, JoinRunRequest phase_timeout
CONTROL_VERSION = 5
# Control frames are small (no tensor bytes), so the bound is tight.
CONTROL_LIMITS = Limits(max_frame=1024 * 1024, max_bin=256 * 1024, max_str=64 * 1024)
MAX_DIMS = 16
# ``TensorRef.dtype`` of a bfloat16 tensor. numpy has no such dtype: the daemon
# sees the elements' bits as uint16 and reduces them as bfloat16.
BF16_DTYPE = "bfloat16"


@message(400)
@dataclass(frozen=True)
class Hello:
    req_id: int
    version: int


@message(401)
@dataclass(frozen=True)
class HelloReply:
    req_id: int
    version: int
    peer_id: str
    features: tuple[str, ...]  # node capabilities: "all_reduce", "dht", "store", ...


@message(402)
@dataclass(frozen=True)
class StatusRequest:
    req_id: int


@message(403)
@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    address: str
    path: str  # "quic", "tcp", "relay", ... as the node reports it
    observed: str  # the address this peer saw us at ("" if unknown)
    throughput_bps: float  # 0.0 when the node has no measurement
    cipher: str = ""  # the data plane's record cipher with this peer (the session's choice)


@message(404)
@dataclass(frozen=True)
class StatusReply:
    req_id: int
    peer_id: str
    pid: int
    uptime_s: float
    listen: tuple[str, ...]
    observed: tuple[str, ...]
    nat: str  # NAT classification, "" when the node has none
    peers: tuple[PeerInfo, ...]
    runs: tuple[str, ...]
    counters: dict[str, int]
    metrics: str  # HOST:PORT of the metrics endpoint, "" when off
    swarm: str  # the swarm key's fingerprint: nodes of one swarm show the same


@message(405)
@dataclass(frozen=True)
class PeersRequest:
    req_id: int


@message(406)
@dataclass(frozen=True)
class PeersReply:
    req_id: int
    peers: tuple[PeerInfo, ...]


@message(407)
@dataclass(frozen=True)
class ConnectRequest:
    req_id: int
    address: str


@message(408)
@dataclass(frozen=True)
class ConnectReply:
    req_id: int
    peer_id: str


@message(410)
@dataclass(frozen=True)
class RegisterSegment:
    """Sent with one memfd in SCM_RIGHTS; ``size`` must match the sealed file."""

    req_id: int
    segment: int
    size: int


@message(411)
@dataclass(frozen=True)
class ReleaseSegment:
    req_id: int
    segment: int


@message(412)
@dataclass(frozen=True)
class SegmentGift:
    """Daemon -> client, with one memfd: a segment the client now owns."""

    segment: int
    size: int


@message(413)
@dataclass(frozen=True)
class TensorRef:
    segment: int
    offset: int
    dtype: str  # numpy dtype string, e.g. "<f4", or BF16_DTYPE
    shape: tuple[int, ...]


@message(414)
@dataclass(frozen=True)
class Ok:
    req_id: int


@message(415)
@dataclass(frozen=True)
class EchoRequest:
    """Hand a tensor to the daemon and back. mode 0: map only; 1: reply with the
    blake3 digest of its bytes; 2: flip every byte's top bit in place."""

    req_id: int
    tensor: TensorRef
    mode: int


@message(416)
@dataclass(frozen=True)
class EchoReply:
    req_id: int
    digest: bytes


@message(420)
@dataclass(frozen=True)
class AllReduceRequest:
    req_id: int
    run: str
    tensor: TensorRef
    op: str  # "avg" | "sum"
    tag: str
    quant: int
    retry: bool
    out: TensorRef | None  # where the result goes; None: into ``tensor``


@message(421)
@dataclass(frozen=True)
class AllReduceReply:
    req_id: int
    participants: tuple[str, ...]
    revision: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    attempts: int


@message(422)
@dataclass(frozen=True)
class ViewRequest:
    req_id: int
    run: str


@message(423)
@dataclass(frozen=True)
class ViewReply:
    req_id: int
    run: str
    revision: int
    members: tuple[str, ...]
    me: str


@message(430)
@dataclass(frozen=True)
class JoinRunRequest:
    """Join ``run``: with ``members`` all listed peers start together; without,
    ask the run's connected members for admission at their next round boundary."""

    req_id: int
    run: str
    members: tuple[str, ...] | None
    timeout: float | None
    phase_timeout: float | None = None  # None: the engine's default


@message(431)
@dataclass(frozen=True)
class LeaveRunRequest:
    req_id: int
    run: str


@message(432)
@dataclass(frozen=True)
class UpdateViewRequest:
    """A round boundary of ``run``: agree the next view with its members,
    admitting the joiners waiting (answered with a ``ViewReply``)."""

    req_id: int
    run: str


@message(424)
@dataclass(frozen=True)
class AllGatherRequest:
    req_id: int
    run: str
    tensor: TensorRef
    tag: str
    retry: bool


@message(425)
@dataclass(frozen=True)
class TensorsReply:
    """Arrays the daemon wrote into gifted segments, plus who they came from."""

    req_id: int
    tensors: tuple[TensorRef, ...]
    peers: tuple[str, ...]


@message(426)
@dataclass(frozen=True)
class SyncStateRequest:
    req_id: int
    run: str
    names: tuple[str, ...]
    tensors: tuple[TensorRef, ...]
    revision: int
    strategy: int


@message(427)
@dataclass(frozen=True)
class SyncStateReply:
    req_id: int
    revision: int
    participants: tuple[str, ...]
    tensors_received: tuple[str, ...]
    bytes_received: int
    bytes_sent: int


@message(428)
@dataclass(frozen=True)
class SendRequest:
    req_id: int
    run: str
    peer: str
    tensor: TensorRef
    tag: str


@message(429)
@dataclass(frozen=True)
class RecvRequest:
    req_id: int
    run: str
    peer: str
    tag: str


@message(440)
@dataclass(frozen=True)
class DhtGetRequest:
    req_id: int
    key: bytes


@message(441)
@dataclass(frozen=True)
class DhtGetReply:
    req_id: int
    values: tuple[tuple[bytes | None, Any], ...]  # (subkey, value), subkey None = plain


@message(442)
@dataclass(frozen=True)
class DhtPutRequest:
    req_id: int
    key: bytes
    value: Any
    ttl: float


@message(443)
@dataclass(frozen=True)
class DhtPutReply:
    req_id: int
    stored_at: int


@message(450)
@dataclass(frozen=True)
class StoreGetRequest:
    req_id: int
    doc: str
    key: str  # "" returns the whole document


@message(451)
@dataclass(frozen=True)
class StoreGetReply:
    req_id: int
    value: Any


@message(452)
@dataclass(frozen=True)
class StoreSetRequest:
    req_id: int
    doc: str
    key: str
    value: Any


@message(499)
@dataclass(frozen=True)
class CtlError:
    """``kind`` is a peerd error class name (``PeerLost``, ``ConfigError``, ...)."""

    req_id: int
    kind: str
    message: str
    peers: tuple[str, ...]  # for PeerLost: who is gone
