"""The pure parts of shared-state sync: the popular rule, download planning,
striping, piece hashing and message validation."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.api import SyncStrategy
from collectives.local_ops import LocalArrays, popular_state
from collectives.state import (
    PIECE_BYTES,
    PieceRef,
    TensorInfo,
    Vote,
    assign,
    needed_pieces,
    piece_count,
    plan_downloads,
    popular,
    tensor_digest,
)
from collectives.statebuf import capture, describe
from collectives.statemsg import Announce, ArrayHeader, Fetch, TensorEntry
from peerd.errors import ConfigError, ProtocolError
from peerd.wire import decode_untrusted, encode

strategies_st = st.sampled_from(list(SyncStrategy))
votes_st = st.dictionaries(
    st.sampled_from([f"m{i}" for i in range(8)]),
    st.tuples(st.integers(0, 3), strategies_st, st.sampled_from([b"a" * 32, b"b" * 32, b"c" * 32])),
    min_size=1,
)


Raw = dict[str, tuple[int, SyncStrategy, bytes]]


@settings(max_examples=200)
@given(votes_st)
def test_popular_matches_the_local_group_rule(raw: Raw) -> None:
    """The engine's rule and LocalGroup's pick the same state and holders."""
    votes = {p: Vote(r, s, d) for p, (r, s, d) in raw.items()}
    order = sorted(raw)
    ours = popular(votes, order)
    contributions = {p: (r, s, LocalArrays({}, {"digest": d}), d) for p, (r, s, d) in raw.items()}
    theirs, holders = popular_state({p: contributions[p] for p in order})
    if ours is None:
        assert theirs is None and holders == []
        return
    assert ours.holders == tuple(holders)
    assert theirs is not None and theirs.hashes["digest"] == ours.digest


@settings(max_examples=200)
@given(votes_st)
def test_popular_rule_properties(raw: Raw) -> None:
    votes = {p: Vote(r, s, d) for p, (r, s, d) in raw.items()}
    win = popular(votes, sorted(votes))
    voters = {p: v for p, v in votes.items() if v.strategy != SyncStrategy.RECEIVE_ONLY}
    if not voters:
        assert win is None
        return
    assert win is not None
    counts: dict[tuple[int, bytes], int] = {}
    for v in voters.values():
        counts[(v.revision, v.digest)] = counts.get((v.revision, v.digest), 0) + 1
    best = max(counts.values())
    assert counts[(win.revision, win.digest)] == best
    tied = [k for k, c in counts.items() if c == best]
    assert win.revision == max(k[0] for k in tied)
    assert win.digest == min(k[1] for k in tied if k[0] == win.revision)
    assert set(win.holders) == {p for p, v in voters.items()
                                if (v.revision, v.digest) == (win.revision, win.digest)}
    # the order of arrival does not change the outcome
    assert popular(votes, sorted(votes, reverse=True)).digest == win.digest  # type: ignore[union-attr]


@settings(max_examples=100)
@given(st.lists(st.integers(1, 3 * PIECE_BYTES), min_size=1, max_size=12),
       st.integers(1, 5))
def test_assign_covers_every_piece_once_and_balances(sizes: list[int], n: int) -> None:
    refs = [PieceRef(i, 0, b) for i, b in enumerate(sizes)]
    sources = [f"h{i}" for i in range(n)]
    plan = assign(refs, sources)
    got = sorted((r for rs in plan.values() for r in rs), key=lambda r: r.tensor)
    assert got == refs
    loads = [sum(r.nbytes for r in rs) for rs in plan.values()]
    if len(refs) >= n:
        assert len(plan) == n  # everyone serves
    # greedy: no source carries more than the lightest plus one piece
    assert max(loads) - min(loads) <= max(sizes) or len(plan) < n


def test_equal_pieces_go_round_robin() -> None:
    refs = [PieceRef(0, k, PIECE_BYTES) for k in range(7)]
    plan = assign(refs, ["a", "b", "c"])
    assert [r.piece for r in plan["a"]] == [0, 3, 6]
    assert [r.piece for r in plan["b"]] == [1, 4]
    assert [r.piece for r in plan["c"]] == [2, 5]


def test_describe_detects_every_changed_piece_and_pieces_split_right() -> None:
    a = np.arange(PIECE_BYTES // 2, dtype=np.float32)  # 2 pieces exactly
    info = describe(capture({"a": a})["a"])
    assert len(info.pieces) == piece_count(a.nbytes) == 2
    b = a.copy()
    b[-1] += 1
    info_b = describe(capture({"b": b})["b"])
    assert info_b.pieces[0] == info.pieces[0] and info_b.pieces[1] != info.pieces[1]
    assert info_b.digest != info.digest
    # same bytes, other shape or dtype: another tensor
    assert describe(capture({"c": a.reshape(2, -1)})["c"]).digest != info.digest
    assert describe(capture({"d": a.view(np.int32)})["d"]).digest != info.digest


def test_plan_downloads() -> None:
    def info(dtype: str, shape: tuple[int, ...], tag: bytes) -> TensorInfo:
        return TensorInfo(dtype, shape, 4, (tag * 32,), tag * 32)

    mine = {"x": info("float32", (1,), b"a"), "y": info("float32", (1,), b"b")}
    win = {"x": info("float32", (1,), b"a"), "y": info("float32", (1,), b"c")}
    assert plan_downloads(mine, win) == ("y",)
    assert [r.tensor for r in needed_pieces(win, ["y"])] == [1]
    with pytest.raises(ConfigError, match="names"):
        plan_downloads({"x": mine["x"]}, win)
    with pytest.raises(ConfigError, match="int32"):
        plan_downloads({**mine, "y": info("int32", (1,), b"b")}, win)


def test_messages_reject_inconsistent_tensors() -> None:
    info = describe(capture({"w": np.ones(300_000, np.float32)})["w"])
    entry = TensorEntry.of("w", info)
    ann = Announce("run", 3, SyncStrategy.ENFORCE_POPULAR, (entry,))
    assert decode_untrusted(encode(ann), expect=Announce) == ann
    body = encode(ann)
    # flip one byte of a piece hash on the wire: the digest no longer matches
    i = body.index(info.pieces[0])
    forged = body[:i] + bytes([body[i] ^ 1]) + body[i + 1:]
    with pytest.raises(ProtocolError):
        decode_untrusted(forged, expect=Announce)
    with pytest.raises(ValueError):
        TensorEntry("w", "float32", (10,), info.pieces, info.digest)
    with pytest.raises(ValueError):
        TensorEntry("w", "float33", (1,), (), tensor_digest("float33", (1,), 4, ()))
    with pytest.raises(ValueError):
        Announce("run", 1, SyncStrategy.SEND_ONLY, (entry, entry))
    with pytest.raises(ValueError):
        Fetch("run", b"k", 0, (1, 2), (0,))
    with pytest.raises(ValueError):
        ArrayHeader("float32", (-1,))
    with pytest.raises(ValueError):
        ArrayHeader("float32", (1 << 30, 1 << 30))


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_decoders_raise_only_protocol_error(data: bytes) -> None:
    for cls in (Announce, Fetch, ArrayHeader):
        with contextlib.suppress(ProtocolError):
            decode_untrusted(data, expect=cls)
