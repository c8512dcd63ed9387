"""Freezing a process's start-up heap (in a child process: freezing is for good)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc, weakref
from peerd.heap import freeze_startup_heap

class Node:
    pass

kept, garbage = Node(), Node()
garbage.self = garbage  # a cycle: only a collection frees it
dead = weakref.ref(garbage)
del garbage
gc.disable()  # no automatic collection may free it before the call
freeze_startup_heap()
assert dead() is None, "garbage made before start-up ended was frozen, not collected"
assert gc.get_freeze_count() > 0 and gc.is_tracked(kept)
gc.enable()
later = Node()
later.self = later
gone = weakref.ref(later)
del later
gc.collect()
assert gone() is None, "objects made after the freeze must still be collected"
print("ok", gc.get_freeze_count())
"""


def test_freezing_collects_first_and_leaves_later_objects_collectable() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    word, count = out.stdout.split()
    assert word == "ok" and int(count) > 1000  # all that was alive, not just ours
