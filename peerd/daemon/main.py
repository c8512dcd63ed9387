"""``peerd start``: run one node as a daemon until SIGTERM/SIGINT.

Start-up order: logging, data dir (0700), swarm key (never invented), identity
(created on first start), node, control socket, metrics, bootstrap tasks, then
one ``daemon.ready`` log line. Shutdown on a signal runs the same steps
backwards: stop accepting clients and remove the socket, let the node leave
(sessions closed with a reason peers can read), flush the logs, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import trio

from peerd.config import NodeConfig, format_address
from peerd.daemon.bootstrap import keep_connected
from peerd.daemon.config import DaemonConfig
from peerd.daemon.control import serve_control
from peerd.daemon.metrics import serve_metrics
from peerd.daemon.service import ControlService
from peerd.errors import ConfigError
from peerd.heap import freeze_startup_heap
from peerd.identity import Identity, SwarmKey
from peerd.log import event
from peerd.node import open_node

log = logging.getLogger("peerd.daemon")

LEAVE_TIMEOUT = 3.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT,
                        stream=sys.stderr, force=True)
    # aioquic logs each connection's version and ALPN negotiation at INFO: in a
    # daemon with many peers that drowns peerd's own events. Shown at debug only.
    logging.getLogger("quic").setLevel(logging.NOTSET if level == "debug" else logging.WARNING)


def load_swarm_key(path: Path) -> SwarmKey:
    if not path.exists():
        raise ConfigError(
            f"swarm_key: no swarm key at {path}; a node only joins a swarm whose key it "
            "holds: get the key file from the run's organiser (pass --swarm-key PATH), or "
            f"start a new swarm with `peerd swarm-key new --out {path}`")
    return SwarmKey.load(path)


def load_or_create_identity(path: Path) -> Identity:
    if path.exists():
        return Identity.load(path)
    ident = Identity.generate()
    ident.save(path)
    event(log, "identity.created", peer=ident.peer_id.text, path=path)
    return ident


def prepare_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {path} ({exc}); choose a writable "
                          "--data-dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"data_dir: {path} is not writable; choose a writable --data-dir")


def run_daemon(cfg: DaemonConfig) -> int:
    """Run until a signal; returns the process exit status."""
    setup_logging(cfg.log_level)
    prepare_data_dir(cfg.data_dir)
    swarm_key = load_swarm_key(cfg.swarm_key)
    identity = load_or_create_identity(cfg.identity)
    try:
        return trio.run(_serve, cfg, identity, swarm_key)
    except BaseExceptionGroup as group:
        # Nurseries wrap a start-up ConfigError; the user should see the one line.
        first = _first_config_error(group)
        if first is None:
            raise
        raise first from None
    finally:
        logging.shutdown()


def _first_config_error(group: BaseExceptionGroup) -> ConfigError | None:
    for exc in group.exceptions:
        if isinstance(exc, ConfigError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_config_error(exc)
            if found is not None:
                return found
    return None


async def _serve(cfg: DaemonConfig, identity: Identity, swarm_key: SwarmKey) -> int:
    node_cfg = NodeConfig(listen=cfg.listen, data_dir=cfg.data_dir,
                          max_peers=cfg.limits.max_peers,
                          max_pending_handshakes=cfg.limits.max_pending_handshakes,
                          data_channels=cfg.data_channels, data_threads=cfg.data_threads,
                          data_ciphers=cfg.data_ciphers, data_congestion=cfg.data_congestion)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        started = False
        try:
            node_cm = open_node(swarm_key, identity, listen=cfg.listen, config=node_cfg)
            async with node_cm as node:
                started = True
                service = ControlService(node, trio.current_time)
                async with trio.open_nursery() as nursery:
                    if cfg.metrics is not None:
                        port = await nursery.start(serve_metrics, cfg.metrics[0],
                                                   cfg.metrics[1], node, service.counters)
                        service.metrics_address = format_address((cfg.metrics[0], port))
                    # The control socket opens last: a daemon that answers is complete.
                    await nursery.start(serve_control, cfg.socket, service,
                                        cfg.limits.max_clients, cfg.limits.max_inflight)
                    for addr in cfg.bootstrap:
                        nursery.start_soon(keep_connected, node, addr, service.counters)
                    freeze_startup_heap()
                    event(log, "daemon.ready", peer=node.peer_id.text,
                          listen=",".join(node.listen_addresses), socket=cfg.socket,
                          metrics=service.metrics_address or "off", swarm=swarm_key.fingerprint,
                          pid=os.getpid())
                    async for signum in signals:
                        event(log, "daemon.stopping", signal=signal.Signals(signum).name)
                        break
                    nursery.cancel_scope.cancel()
                leave = getattr(node, "leave", None)
                if leave is not None:
                    with trio.move_on_after(LEAVE_TIMEOUT):
                        await leave()
        except OSError as exc:
            if started:
                raise
            raise ConfigError(f"listen: cannot bind {format_address(cfg.listen)} ({exc}); "
                              "choose another --listen address or port") from None
    event(log, "daemon.stopped", peer=identity.peer_id.text)
    return 0
