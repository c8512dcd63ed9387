"""Client of the local peerd daemon: ``peerd.connect()``."""

from __future__ import annotations

from pathlib import Path

from peerd.client.client import DEFAULT_RUN, DEFAULT_TIMEOUT, Client, ReduceHandle
from peerd.client.conn import Connection, DaemonUnavailable
from peerd.daemon.config import default_socket


def connect(socket: str | Path | None = None, *, run: str = DEFAULT_RUN,
            timeout: float = DEFAULT_TIMEOUT, copy_threads: int | None = None) -> Client:
    """Connect to the daemon's control socket (default: ``$PEERD_SOCKET`` or the
    default data dir's ``control.sock``). ``run`` is the run collectives use
    unless a call names another; ``timeout`` bounds control calls;
    ``copy_threads`` is how many threads copy a large tensor into and out of
    shared memory (default: the usable CPUs, at most 4).
    Raises ``DaemonUnavailable`` when no daemon answers."""
    path = Path(socket) if socket is not None else default_socket()
    conn = Connection(path)
    try:
        return Client(conn, run=run, timeout=timeout, copy_threads=copy_threads)
    except BaseException:
        conn.close()
        raise


__all__ = ["Client", "DaemonUnavailable", "ReduceHandle", "connect"]
