"""The ``peerd`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from peerd.errors import ConfigError, PeerdError
from peerd.identity import Identity, SwarmKey


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


def _demo(args: argparse.Namespace) -> int:
    from peerd.demo import run_demo

    return run_demo(peers=args.peers, megabytes=args.megabytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peerd", description=__doc__)
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

    p = sub.add_parser("demo", help="run a multi-peer demo on this machine")
    p.add_argument("--peers", type=int, default=2, help="number of local peers (default 2)")
    p.add_argument("--megabytes", type=int, default=64,
                   help="bytes each pair exchanges over data channels (default 64 MiB)")
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
