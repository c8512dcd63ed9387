"""The ``peerd`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from peerd.errors import ConfigError, PeerdError
from peerd.identity import Identity, SwarmKey

DESCRIPTION = ("peerd: fault-tolerant peer-to-peer training. `peerd start` runs this "
               "machine's node; the other commands talk to it, or make and inspect key files.")


def _keygen(args: argparse.Namespace) -> int:
    ident = Identity.generate()
    ident.save(Path(args.out))
    print(f"wrote identity {ident.peer_id.text} to {args.out} (mode 0600)")
    return 0


def _swarm_key_new(args: argparse.Namespace) -> int:
    key = SwarmKey.generate()
    key.save(Path(args.out))
    print(f"wrote swarm key (fingerprint {key.fingerprint}) to {args.out} (mode 0600); "
          "share it only with the members of this swarm")
    return 0


def _swarm_key_show(args: argparse.Namespace) -> int:
    key = SwarmKey.load(Path(args.path))
    print(f"{key.fingerprint}  {args.path}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from peerd.daemon.config import load_file, resolve
    from peerd.daemon.main import run_daemon

    def absolute(path: str | None) -> str | None:
        # Flag paths are relative to the working directory, as users expect.
        return None if path is None else str(Path(path).expanduser().absolute())

    file_values = load_file(Path(args.config)) if args.config else {}
    flags = {
        "identity": absolute(args.identity), "swarm_key": absolute(args.swarm_key),
        "data_dir": absolute(args.data_dir), "socket": absolute(args.socket),
        "listen": args.listen, "metrics": args.metrics,
        "bootstrap": args.bootstrap or None,
        "log_level": "debug" if args.verbose else args.log_level,
    }
    return run_daemon(resolve(file_values, flags))


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from peerd.client import connect

    return connect(args.socket, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    from peerd.client.show import as_json, status_text

    with _client(args) as client:
        s = client.status()
    print(as_json(s) if args.json else status_text(s))
    return 0


def _peers(args: argparse.Namespace) -> int:
    from peerd.client.show import as_json, peers_table

    with _client(args) as client:
        peers = client.peers()
    print(as_json(peers) if args.json else peers_table(peers))
    return 0


def _connect(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.connect_peer(args.address))
    return 0


def _dht_get(args: argparse.Namespace) -> int:
    from peerd.client.show import as_json

    with _client(args) as client:
        values = client.dht_get(args.key)
    if not values:
        print(f"no value under {args.key!r}", file=sys.stderr)
        return 1
    plain = values.get(None)
    if len(values) == 1 and isinstance(plain, str | bytes):
        print(plain.decode(errors="replace") if isinstance(plain, bytes) else plain)
    else:
        print(as_json(values))
    return 0


def _dht_put(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stored = client.dht_put(args.key, args.value, ttl=args.ttl)
    print(f"stored on {stored} node(s)")
    return 0


def _add_client_options(p: argparse.ArgumentParser, json_output: bool = False) -> None:
    p.add_argument("--socket", default=None,
                   help="daemon control socket (default: $PEERD_SOCKET or the data dir's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _demo(args: argparse.Namespace) -> int:
    from peerd.demo import run_demo

    return run_demo(peers=args.peers, steps=args.steps, method=args.method,
                    sync_every=args.sync_every)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peerd", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create an Ed25519 node identity")
    p.add_argument("--out", required=True, help="path of the new identity file")
    p.set_defaults(func=_keygen)

    sk = sub.add_parser("swarm-key", help="swarm key tools")
    sk_sub = sk.add_subparsers(dest="swarm_command", required=True)
    p = sk_sub.add_parser("new", help="create a new 32-byte swarm key")
    p.add_argument("--out", required=True, help="path of the new swarm key file")
    p.set_defaults(func=_swarm_key_new)
    p = sk_sub.add_parser("show", help="print a swarm key file's fingerprint (nodes of one "
                          "swarm show the same)")
    p.add_argument("path", help="swarm key file")
    p.set_defaults(func=_swarm_key_show)

    p = sub.add_parser("start", help="run a node as a daemon (until SIGTERM/SIGINT)")
    p.add_argument("--config", help="TOML config file (flags override it)")
    p.add_argument("--identity", help="identity file (created on first start if absent)")
    p.add_argument("--swarm-key", dest="swarm_key", help="swarm key file (from the organiser)")
    p.add_argument("--listen", help="HOST:PORT for QUIC (default 0.0.0.0:4747)")
    p.add_argument("--bootstrap", nargs="+", metavar="ADDR", help="HOST:PORT of known peers")
    p.add_argument("--data-dir", dest="data_dir", help="state directory "
                   "(default $XDG_DATA_HOME/peerd or ~/.local/share/peerd)")
    p.add_argument("--metrics", help="HOST:PORT for the Prometheus endpoint (default off)")
    p.add_argument("--socket", help="control socket path (default DATA_DIR/control.sock)")
    p.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning",
                                                             "error"))
    p.set_defaults(func=_start)

    p = sub.add_parser("status", help="show the local daemon's identity, addresses and peers")
    _add_client_options(p, json_output=True)
    p.set_defaults(func=_status)

    p = sub.add_parser("peers", help="list the local daemon's connected peers")
    _add_client_options(p, json_output=True)
    p.set_defaults(func=_peers)

    p = sub.add_parser("connect", help="make the local daemon dial a peer")
    p.add_argument("address", help="HOST:PORT")
    _add_client_options(p)
    p.set_defaults(func=_connect)

    dht = sub.add_parser("dht", help="read and write the swarm's DHT")
    dht_sub = dht.add_subparsers(dest="dht_command", required=True)
    p = dht_sub.add_parser("get", help="print the value stored under KEY")
    p.add_argument("key")
    _add_client_options(p)
    p.set_defaults(func=_dht_get)
    p = dht_sub.add_parser("put", help="store VALUE under KEY")
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry")
    _add_client_options(p)
    p.set_defaults(func=_dht_put)

    p = sub.add_parser("demo", help="train a small model across N local daemons")
    p.add_argument("--peers", type=int, default=4, help="number of local daemons (default 4)")
    p.add_argument("--steps", type=int, default=60, help="inner steps per peer (default 60)")
    p.add_argument("--method", default="diloco",
                   help="ddp, diloco, delayed, streaming, sparseloco or spes (default diloco)")
    p.add_argument("--sync-every", type=int, default=20,
                   help="inner steps between outer syncs (default 20)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"peerd: error: {exc}", file=sys.stderr)
        return 2
    except PeerdError as exc:
        print(f"peerd: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
