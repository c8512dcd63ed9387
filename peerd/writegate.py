"""A receiver's buffer that readers may write into until the receiver gives up.

Readers are trio tasks or, for channels that do their I/O on worker threads,
OS threads; the receiver is a trio task. A reader calls ``enter`` before it
writes a record into the buffer and ``leave`` after; once the receiver has
called ``close`` no new write starts (``enter`` returns False and the reader
uses scratch), and ``close`` returns only after the writes in progress ended,
so the caller may reuse its buffer at once. A reader that is still waiting on
the network is not in the gate: only decryption into the buffer is.
"""

from __future__ import annotations

import threading
from contextlib import suppress

import trio


class WriteGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers = 0
        self._closed = False
        self._idle: trio.Event | None = None
        self._token = trio.lowlevel.current_trio_token()

    def enter(self) -> bool:
        """Start a write; False once the receiver gave up. Any thread."""
        with self._lock:
            if self._closed:
                return False
            self._writers += 1
            return True

    def leave(self) -> None:
        """End a write started by a successful ``enter``. Any thread."""
        with self._lock:
            self._writers -= 1
            idle = self._idle if self._writers == 0 else None
        if idle is not None:
            with suppress(trio.RunFinishedError):  # nobody is left to wake
                self._token.run_sync_soon(idle.set)

    async def close(self) -> None:
        """Admit no more writes and wait, shielded, for those in progress."""
        with self._lock:
            self._closed = True
            if not self._writers:
                return
            idle = self._idle = trio.Event()
        with trio.CancelScope(shield=True):
            await idle.wait()
