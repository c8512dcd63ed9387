"""A real process acknowledges writes, is SIGKILLed, and every acknowledged write survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from crdt.messages import DocKind
from crdt.store import Store
from peerd.identity import Identity, SwarmKey

SEED = b"crash-writer"
KEY = SwarmKey(b"c" * 32)
ACKS_BEFORE_KILL = 150

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from crdt.store import Store
    from peerd.identity import Identity, SwarmKey

    store = Store.open(Path(sys.argv[1]), Identity.from_seed(SEED), SwarmKey(b"c" * 32))
    i = 0
    while True:  # until killed; each line is printed only after its write committed
        store.doc("run/abc").set(f"k{i}", i)
        store.counter("steps").increment(1)
        store.orset("roster").add(f"p{i}")
        print(f"ack {i}", flush=True)
        i += 1
    """
).replace("SEED", repr(SEED))


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    acked = -1
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked = int(line.split()[1])
            if acked + 1 >= ACKS_BEFORE_KILL:
                os.kill(proc.pid, signal.SIGKILL)  # right after an ack, mid-stream
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert acked + 1 >= ACKS_BEFORE_KILL

    with Store.open(tmp_path, Identity.from_seed(SEED), KEY) as store:
        run = store.doc("run/abc")
        missing = [i for i in range(acked + 1) if run.get(f"k{i}") != i]
        assert missing == []
        assert store.counter("steps").value() >= acked + 1
        roster = store.state(DocKind.ORSET, "roster")
        assert all(f"p{i}" in roster for i in range(acked + 1))
        # The writer may have committed a little beyond its last printed ack, never less.
        assert store.log.max_seq(store.peer_id.raw) >= 3 * (acked + 1)
