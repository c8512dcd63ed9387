"""JSON lines over stdin/stdout: how test and benchmark drivers script a child process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import trio


def emit(**fields: Any) -> None:
    """One event line to the driver; flushed at once (the driver waits on it)."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def commands() -> AsyncIterator[dict[str, Any]]:
    """The driver's commands, one JSON object a line, until stdin closes or
    it says ``{"cmd": "quit"}`` (answered with a ``bye`` event)."""
    # A dup: trio's stream closes its fd when done, stdin itself stays open.
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    async with stdin:
        while chunk := await stdin.receive_some(65536):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                if cmd["cmd"] == "quit":
                    emit(event="bye")
                    return
                yield cmd
