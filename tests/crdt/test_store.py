"""Store API, ingest (the one door for remote deltas), persistence, notifications."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.delta import Op, seal
from crdt.messages import DocKind
from crdt.orset import ORSet
from crdt.store import Store
from peerd.errors import ConfigError
from peerd.identity import Identity, SwarmKey

KEY = SwarmKey(b"k" * 32)
ELEMENTS: list[str | int | bytes] = ["p1", "p2", 3]
IDS = [Identity.from_seed(bytes([i])) for i in range(3)]


class FakeWall:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def make(i: int = 0, directory: Path | None = None) -> Store:
    return Store.open(directory, IDS[i], KEY, wall_clock=FakeWall())


def scripted_writes(store: Store, rng: random.Random, n: int) -> None:
    for _ in range(n):
        choice = rng.randrange(5)
        if choice == 0:
            store.doc("run/abc").set(rng.choice("abc"), rng.randrange(100))
        elif choice == 1:
            store.doc("run/abc").delete(rng.choice("abc"))
        elif choice == 2:
            store.orset("roster").add(rng.choice(ELEMENTS))
        elif choice == 3:
            store.orset("roster").remove(rng.choice(ELEMENTS))
        else:
            store.counter("steps").increment(rng.randrange(-3, 10))


def test_document_api() -> None:
    s = make()
    run = s.doc("run/abc")
    run.set("lr", 0.1)
    run.update({"batch": 32, "model": {"layers": 2}})
    run.delete("batch")
    assert run.items() == [("lr", 0.1), ("model", {"layers": 2})]
    assert run.get("batch", "none") == "none" and "lr" in run
    roster = s.orset("roster")
    roster.add("peer-a")
    roster.add("peer-b")
    roster.remove("peer-a")
    assert roster.elements() == ["peer-b"] and roster.contains("peer-b")
    steps = s.counter("steps")
    steps.increment(10)
    steps.decrement(3)
    assert steps.value() == 7
    # One name may exist once per kind without conflict.
    s.counter("run/abc").increment()
    assert s.names("run/") == [(DocKind.MAP, "run/abc"), (DocKind.COUNTER, "run/abc")]
    assert s.statistics().local_writes == 9


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32), st.data())
def test_any_order_and_duplication_of_signed_deltas_converges(
    seed: int, data: st.DataObject
) -> None:
    rng = random.Random(seed)
    writers = [make(i) for i in range(3)]
    for _ in range(3):
        for w in writers:
            scripted_writes(w, rng, 4)
        a, b = rng.sample(writers, 2)  # partial syncs create causal dependencies
        b.ingest(a.log.missing_for(b.log.version_vector(), 1 << 30).blobs)
    blobs = [blob for w in writers for blob in w.log.blobs_of(w.peer_id.raw, 0)]
    reference = make(0)
    reference.ingest(blobs)
    shuffled = data.draw(st.permutations(blobs + data.draw(st.lists(st.sampled_from(blobs)))))
    replica = make(1)
    for start in range(0, len(shuffled), 5):
        replica.ingest(shuffled[start : start + 5])
    assert replica.snapshot() == reference.snapshot()
    stats = replica.statistics()
    assert stats.accepted == len(blobs) and stats.duplicates == len(shuffled) - len(blobs)


def test_equivocation_keeps_first_and_is_counted() -> None:
    a, b = make(0), make(1)
    a.counter("c").increment(1)
    fork = seal(IDS[0], KEY, 1, (Op(DocKind.COUNTER, "c", a.state(DocKind.COUNTER, "c")
                                    .increment_delta(IDS[0].peer_id.raw, 5)),))
    b.ingest(a.log.missing_for({}, 1 << 20).blobs)
    result = b.ingest([fork.blob])
    assert result.accepted == 0
    assert b.statistics().equivocations == 1 and b.counter("c").value() == 1


def test_reopen_restores_state_exactly(tmp_path: Path) -> None:
    s = make(0, tmp_path)
    scripted_writes(s, random.Random(1), 40)
    remote = make(1)
    scripted_writes(remote, random.Random(2), 20)
    s.ingest(remote.log.missing_for({}, 1 << 20).blobs)
    before, seq = s.snapshot(), s.log.max_seq(IDS[0].peer_id.raw)
    s.doc("z").set("k", 1)
    last_ts = s.state(DocKind.MAP, "z").entry("k").ts
    before, seq = s.snapshot(), seq + 1
    s.close()
    with make(0, tmp_path) as again:
        assert again.snapshot() == before
        assert again.log.max_seq(IDS[0].peer_id.raw) == seq
        # The wall clock restarts behind the last write; the HLC still resumes after it.
        assert again.tick() > last_ts
        again.counter("steps").increment()  # next seq continues, no reuse
        assert again.log.max_seq(IDS[0].peer_id.raw) == seq + 1


def test_reopen_with_another_swarm_key_is_a_config_error(tmp_path: Path) -> None:
    make(0, tmp_path).close()
    with pytest.raises(ConfigError, match="swarm"):
        Store.open(tmp_path, IDS[0], SwarmKey(b"z" * 32))


def test_wal_and_full_sync_are_in_effect(tmp_path: Path) -> None:
    s = make(0, tmp_path)
    conn = s._db._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_failed_commit_leaves_state_untouched(tmp_path: Path) -> None:
    s = make(0, tmp_path)
    s.doc("d").set("k", 1)
    s._db.close()  # the disk "goes away": the next write must fail, not half-apply
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.ProgrammingError
        s.doc("d").set("k", 2)
    assert s.doc("d").get("k") == 1 and s.log.max_seq(IDS[0].peer_id.raw) == 1


async def test_wait_changed_and_subscribe() -> None:
    s = make()
    seen: list[str] = []
    async with trio.open_nursery() as nursery, s.subscribe("run/") as changes:

        async def waiter() -> None:
            version = await s.wait_changed("run/abc", 0)
            seen.append(f"v{version}")

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        s.counter("metrics/x").increment()  # outside the prefix
        s.doc("run/abc").set("a", 1)
        s.doc("run/abc").set("b", 2)  # coalesces with the pending change
        s.orset("run/peers").add("x")
        first = await changes.next()
        second = await changes.next()
        assert (first.kind, first.name) == (DocKind.MAP, "run/abc")
        assert (second.kind, second.name) == (DocKind.ORSET, "run/peers")
        assert changes.drain() == []
    assert seen == ["v1"] or seen == ["v2"]


def test_remove_of_unknown_element_writes_nothing() -> None:
    s = make()
    s.orset("r").remove("ghost")
    s.doc("d").delete("ghost")
    assert s.statistics().local_writes == 0
    assert isinstance(s.state(DocKind.ORSET, "r") or ORSet(), ORSet)
