"""peerd: fault-tolerant peer-to-peer training daemon.

``peerd.connect()`` returns a client of the local daemon; ``peerd.open_node()``
runs a node inside a trio program. Both are imported on first use so that
``import peerd.wire`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["connect", "open_node"]


def __getattr__(name: str) -> Any:
    if name == "connect":
        from peerd.client import connect

        return connect
    if name == "open_node":
        from peerd.node import open_node

        return open_node
    raise AttributeError(f"module 'peerd' has no attribute {name!r}")
