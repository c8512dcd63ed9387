"""The garbage collector in a long-running peerd process."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Exempt what start-up created from later collections.

    After start-up a process holds ~100-200K long-lived objects (torch,
    numpy, aioquic, cryptography), and each full collection walks them all:
    0.1-0.27 s with the event loop stopped, long enough to skew a link
    probe or a phase deadline. They live as long as the process does, so
    collecting once and freezing the survivors (``gc.freeze``) loses
    nothing; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()
