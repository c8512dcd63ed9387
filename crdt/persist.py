"""SQLite persistence of the delta log (stdlib ``sqlite3``).

The store's state is a pure function of the set of deltas it accepted, so the
database holds exactly those sealed blobs; reopening replays them. A write is
acknowledged only after its transaction commits.

Durability settings: WAL journal with ``synchronous=FULL``. In WAL mode
``NORMAL`` survives a process crash but may lose the last commits on power
loss or a kernel panic, because the WAL is fsynced only at checkpoints; our
failure model includes power loss and the promise is "acknowledged means
durable", so every commit fsyncs the WAL (``FULL``). The cost is one fsync per
commit; remote deltas are committed one batch per sync message, not one each.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from peerd.errors import ConfigError

SCHEMA_VERSION = "1"
DB_FILENAME = "crdt.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deltas (
    author BLOB NOT NULL,
    seq INTEGER NOT NULL,
    digest BLOB NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (author, seq)
) WITHOUT ROWID;
"""

Row = tuple[bytes, int, bytes, bytes]


class DeltaDB:
    """The on-disk delta log; ``path=None`` keeps it in memory (tests, benchmarks)."""

    def __init__(self, path: Path | None, swarm_fingerprint: str) -> None:
        self.path = path
        target = ":memory:" if path is None else str(path)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit BEGIN/COMMIT below.
            self._conn = sqlite3.connect(target, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open CRDT database {target}: {exc}") from exc
        self._check_meta("schema", SCHEMA_VERSION)
        self._check_meta("swarm", swarm_fingerprint)

    def _check_meta(self, key: str, expected: str) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, expected))
        elif row[0] != expected:
            raise ConfigError(
                f"CRDT database {self.path} was written with {key}={row[0]}, this node has "
                f"{key}={expected}; use another --data-dir or the matching swarm key"
            )

    def append(self, rows: Iterable[Row]) -> None:
        """Insert rows in one transaction; returns once it is durable."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO deltas (author, seq, digest, blob) VALUES (?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def load(self) -> Iterator[Row]:
        yield from self._conn.execute("SELECT author, seq, digest, blob FROM deltas")

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM deltas").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


__all__ = ["DB_FILENAME", "DeltaDB"]
