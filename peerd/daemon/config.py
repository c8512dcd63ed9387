"""Daemon configuration: a TOML file and command-line flags, flags win.

Everything here is pure (no sockets, no clock): ``load_file`` reads and
validates a TOML file, ``resolve`` merges file values, flags and defaults into
one frozen ``DaemonConfig``. Every problem is a ``ConfigError`` whose one-line
message names the field and says what to change; the CLI turns it into exit
code 2.

File format (every key optional)::

    data_dir  = "/var/lib/peerd"        # default: $XDG_DATA_HOME/peerd
    identity  = "identity"              # relative paths: relative to data_dir
    swarm_key = "swarm.key"
    listen    = "0.0.0.0:4747"
    bootstrap = ["203.0.113.7:4747"]
    metrics   = "127.0.0.1:9474"        # omit to disable the metrics endpoint
    socket    = "control.sock"
    log_level = "info"                  # debug | info | warning | error
    data_channels = 2                   # TCP connections per peer link (1-64); more
                                        # for long fat pipes (bandwidth x RTT > a few MB)
    data_threads = true                 # move large data messages on worker threads too
                                        # (links faster than one core encrypts); default:
                                        # only reductions, with >= 4 cores
    data_ciphers = ["aegis128l"]        # record ciphers offered, preferred first;
                                        # default: all installed, fastest first
    data_congestion = "bbr"             # TCP congestion control of the data sockets;
                                        # default "cubic"; "system": the host's default
    [limits]
    max_peers = 512
    max_pending_handshakes = 64
    max_clients = 32
    max_inflight = 64                   # concurrent requests per client
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerd.errors import ConfigError

SOCKET_NAME = "control.sock"
IDENTITY_NAME = "identity"
SWARM_KEY_NAME = "swarm.key"
LOG_LEVELS = ("debug", "info", "warning", "error")
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Limits:
    max_peers: int = 512
    max_pending_handshakes: int = 64
    max_clients: int = 32
    max_inflight: int = 64


@dataclass(frozen=True)
class DaemonConfig:
    data_dir: Path
    identity: Path
    swarm_key: Path
    socket: Path
    listen: tuple[str, int]
    bootstrap: tuple[tuple[str, int], ...]
    metrics: tuple[str, int] | None
    log_level: str
    limits: Limits
    data_channels: int
    data_congestion: str
    data_threads: bool | None = None
    data_ciphers: tuple[str, ...] | None = None


_TOP_KEYS: dict[str, type] = {
    "data_dir": str, "identity": str, "swarm_key": str, "listen": str, "bootstrap": list,
    "metrics": str, "socket": str, "log_level": str, "limits": dict, "data_channels": int,
    "data_threads": bool, "data_ciphers": list, "data_congestion": str,
}
MAX_DATA_CHANNELS = 64  # what a peer accepts (peerd.dataplane.MAX_CHANNELS)
_LIMIT_KEYS = ("max_peers", "max_pending_handshakes", "max_clients", "max_inflight")
_LIMIT_RANGES = {"max_peers": (1, 100_000), "max_pending_handshakes": (1, 100_000),
                 "max_clients": (1, 4096), "max_inflight": (1, 4096)}


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$PEERD_DATA_DIR``, else ``$XDG_DATA_HOME/peerd``, else ``~/.local/share/peerd``."""
    env = os.environ if env is None else env
    if env.get("PEERD_DATA_DIR"):
        return Path(env["PEERD_DATA_DIR"])
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "share")
    return Path(base).expanduser() / "peerd"


def default_socket(env: Mapping[str, str] | None = None) -> Path:
    """Where clients look for the daemon: ``$PEERD_SOCKET`` or the default data dir's."""
    env = os.environ if env is None else env
    if env.get("PEERD_SOCKET"):
        return Path(env["PEERD_SOCKET"])
    return default_data_dir(env) / SOCKET_NAME


def load_file(path: Path) -> dict[str, Any]:
    """Read and type-check a TOML config file; relative paths in it are made
    relative to the file's directory."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc}); "
                          "pass a readable TOML file to --config") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    return check_values(raw, where=str(path), base=Path(path).resolve().parent)


def check_values(raw: Mapping[str, Any], where: str, base: Path | None = None) -> dict[str, Any]:
    """Validate names and types of config values (as from TOML)."""
    out: dict[str, Any] = {}
    for key, raw_value in raw.items():
        value: Any = raw_value
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys are "
                              + ", ".join(sorted(_TOP_KEYS)))
        want = _TOP_KEYS[key]
        if type(raw_value) is not want and not (want is not int and isinstance(raw_value, want)):
            kind = {dict: "a table", list: "a list", int: "an integer",
                    bool: "true or false"}.get(want, "a string")
            raise ConfigError(f"{where}: {key} must be {kind}, got {type(value).__name__} "
                              f"{value!r}")
        if key == "data_channels" and not 1 <= value <= MAX_DATA_CHANNELS:
            raise ConfigError(f"{where}: data_channels = {value} is out of range; use a value "
                              f"between 1 and {MAX_DATA_CHANNELS}")
        if key == "data_ciphers" and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: data_ciphers must be a list of cipher names, "
                              "e.g. [\"aegis128x2\", \"aegis128l\"]")
        if key == "bootstrap" and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: bootstrap must be a list of \"HOST:PORT\" strings")
        if key in ("data_dir", "identity", "swarm_key", "socket") and base is not None:
            p = Path(value).expanduser()
            value = str(p if p.is_absolute() or key != "data_dir" else base / p)
        out[key] = value
    limits = out.get("limits", {})
    for key, value in limits.items():
        if key not in _LIMIT_KEYS:
            raise ConfigError(f"{where}: unknown key limits.{key}; known limits are "
                              + ", ".join(_LIMIT_KEYS))
        if type(value) is not int:
            raise ConfigError(f"{where}: limits.{key} must be an integer, got {value!r}")
        lo, hi = _LIMIT_RANGES[key]
        if not lo <= value <= hi:
            raise ConfigError(f"{where}: limits.{key} = {value} is out of range; "
                              f"use a value between {lo} and {hi}")
    return out


def _in_data_dir(data_dir: Path, value: str | None, default: str) -> Path:
    p = Path(value).expanduser() if value else Path(default)
    return p if p.is_absolute() else data_dir / p


def resolve(file_values: Mapping[str, Any], flags: Mapping[str, Any],
            env: Mapping[str, str] | None = None) -> DaemonConfig:
    """Merge defaults < file values < flags (``None`` flags are unset)."""
    # Imported here so that clients, which only need ``default_socket``, do not
    # load the QUIC stack that ``peerd.config`` pulls in.
    from peerd.config import DEFAULT_PORT, NodeConfig, parse_address
    from peerd.datasock import check_congestion

    merged: dict[str, Any] = dict(file_values)
    merged.update({k: v for k, v in flags.items() if v is not None})
    data_dir = Path(merged["data_dir"]).expanduser() if merged.get("data_dir") \
        else default_data_dir(env)
    data_dir = data_dir.absolute()
    listen = parse_address(merged.get("listen", f"0.0.0.0:{DEFAULT_PORT}"), "listen")
    bootstrap = tuple(parse_address(b, "bootstrap address") for b in merged.get("bootstrap", ()))
    metrics = parse_address(merged["metrics"], "metrics") if merged.get("metrics") else None
    level = str(merged.get("log_level", "info")).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    sock = _in_data_dir(data_dir, merged.get("socket"), SOCKET_NAME)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise ConfigError(f"socket path {sock} is longer than {MAX_SOCKET_PATH} bytes; "
                          "choose a shorter data_dir or socket path")
    limits = Limits(**merged.get("limits", {}))
    return DaemonConfig(
        data_dir=data_dir,
        identity=_in_data_dir(data_dir, merged.get("identity"), IDENTITY_NAME),
        swarm_key=_in_data_dir(data_dir, merged.get("swarm_key"), SWARM_KEY_NAME),
        socket=sock, listen=listen, bootstrap=bootstrap, metrics=metrics,
        log_level=level, limits=limits,
        data_channels=merged.get("data_channels", NodeConfig.data_channels),
        data_threads=merged.get("data_threads", NodeConfig.data_threads),
        data_ciphers=_ciphers(merged.get("data_ciphers")),
        data_congestion=check_congestion(merged.get("data_congestion",
                                                     NodeConfig.data_congestion)),
    )


def _ciphers(names: list[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    from peerd import aead

    try:
        return aead.check_offer(names)
    except ValueError as exc:
        raise ConfigError(f"data_ciphers {names}: {exc}") from None
