"""Node configuration: defaults, parsing of addresses, validation with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peerd import aead
from peerd.datasock import DEFAULT_CONGESTION, DEFAULT_NOTSENT_LOWAT, check_congestion
from peerd.errors import ConfigError
from peerd.record import DEFAULT_MAX_PLAINTEXT
from peerd.rpc import RpcLimits

DEFAULT_PORT = 4747


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ``ConfigError`` if bad."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{what} {text!r} must look like HOST:PORT, e.g. 127.0.0.1:4747")
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535 or not host:
        raise ConfigError(f"{what} {text!r}: needs a host and a port between 0 and 65535")
    return host, port


def format_address(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs besides its identity and swarm key."""

    listen: tuple[str, int] = ("127.0.0.1", 0)
    bootstrap: tuple[tuple[str, int], ...] = ()
    data_dir: Path | None = None
    max_pending_handshakes: int = 64
    max_peers: int = 512
    # TCP connections per data link. Two, not more: through a shaped 200 Mbit/s
    # uplink, a ring over persistent connections reached 0.87 of the limit with
    # four streams per hop (plain sockets and peerd alike) but 0.92-0.93 with
    # one or two, which compete less in the bottleneck's queue; on loopback two
    # cost no time. One stream's window (a few MB) covers a path's bandwidth x
    # round trip up to ~0.5 Gbit/s at 100 ms; raise this for fatter pipes.
    data_channels: int = 2
    # Worker threads for the data path's bulk work. True: large data messages
    # are moved (socket I/O and cipher) and large ring blocks reduced on them,
    # so a node's channels run on several cores (for links faster than one
    # core encrypts, ~15 Gbit/s); False: everything on the event loop. None:
    # reductions and result copies on threads where this process may use at
    # least 4 cores (on fewer, shared, the hand-off costs more than it gains),
    # messages on the event loop wherever the native record loops are built
    # (``peerd.datachan.DataConfig.crypto_threads`` says why).
    data_threads: bool | None = None
    # Largest plaintext of one data record. Every peer of a swarm must use the
    # same: a larger record than the receiver's is refused. With data threads,
    # 4 MiB records cut the user CPU per byte by 20-27% on the 2-core VMs
    # (fewer GIL hand-offs per byte), but raise the buffers each busy channel
    # keeps; not yet measured where the threads run (16 cores).
    data_record: int = DEFAULT_MAX_PLAINTEXT
    # Record ciphers this node offers in its handshakes, preferred first (see
    # ``peerd.aead``); None: every one this install has, fastest first.
    data_ciphers: tuple[str, ...] | None = None
    # TCP congestion control of the data sockets: a kernel name ("cubic",
    # "bbr", ...) or "system" for the host's default (see
    # ``peerd.datasock.DEFAULT_CONGESTION`` for why CUBIC).
    data_congestion: str = DEFAULT_CONGESTION
    # Unsent bytes each data socket may hold, so that a small message (a
    # status report, another tag's round) queues behind this much rather than
    # a whole send buffer (``peerd.datasock.DEFAULT_NOTSENT_LOWAT``); 0: the
    # kernel's default.
    data_notsent_lowat: int = DEFAULT_NOTSENT_LOWAT
    rpc: RpcLimits = field(default_factory=RpcLimits)

    def __post_init__(self) -> None:
        if self.max_pending_handshakes < 1:
            raise ConfigError("max_pending_handshakes must be at least 1")
        if not 64 * 1024 <= self.data_record <= 16 << 20:
            raise ConfigError(f"data_record = {self.data_record} is out of range; use 64 KiB "
                              "to 16 MiB, the same on every peer")
        if not 1 <= self.data_channels <= 64:
            raise ConfigError("data_channels must be between 1 and 64")
        if self.data_ciphers is not None:
            try:
                aead.check_offer(self.data_ciphers)
            except ValueError as exc:
                raise ConfigError(f"data_ciphers: {exc}") from None
        check_congestion(self.data_congestion)
        if not 0 <= self.data_notsent_lowat <= 1 << 30:
            raise ConfigError(f"data_notsent_lowat = {self.data_notsent_lowat} is out of range; "
                              "use 0 (the kernel's default) to 1 GiB")
