"""Structured logging: an event name plus key=value fields on one line."""

from __future__ import annotations

import logging
from typing import Any


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.log(level, "%s %s", name, text, extra={"event": name, "fields": fields})
