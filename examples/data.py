"""Byte-level language-modelling data: the Python standard library's own sources.

Every machine with Python has the corpus (``sysconfig.get_paths()["stdlib"]``).
Files are taken in sorted relative-path order; a file belongs to the held-out
split when crc32 of its relative path is 0 mod ``HELD_OUT_MOD``, so the split
is the same on every machine with the same Python version and never depends
on reading order. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import functools
import sysconfig
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 256
HELD_OUT_MOD = 20
DEFAULT_TRAIN_BYTES = 4_000_000
DEFAULT_EVAL_BYTES = 400_000


def stdlib_files() -> list[Path]:
    """The stdlib's .py files (no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_held_out(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELD_OUT_MOD == 0


_LOAD_LOCK = threading.Lock()


def load_corpus(
    train_bytes: int = DEFAULT_TRAIN_BYTES, eval_bytes: int = DEFAULT_EVAL_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) uint8 tensors, each capped at the given size (cached; callers
    must not modify them)."""
    with _LOAD_LOCK:  # member threads share one read of the corpus
        return _load(train_bytes, eval_bytes)


@functools.lru_cache(maxsize=4)
def _load(train_bytes: int, eval_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    caps = {False: train_bytes, True: eval_bytes}
    for path in stdlib_files():
        held = _is_held_out(path.relative_to(root).as_posix())
        if sizes[held] >= caps[held]:
            if all(sizes[k] >= caps[k] for k in caps):
                break
            continue
        try:
            blob = path.read_bytes()
        except OSError:
            continue
        parts[held].append(blob)
        sizes[held] += len(blob)
    out = []
    for held in (False, True):
        data = b"".join(parts[held])[: caps[held]]
        out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).clone())
    return out[0], out[1]


@dataclass
class ByteStream:
    """Random windows of a byte tensor, drawn from a per-worker seeded generator."""

    data: torch.Tensor
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (batch_size,),
                               generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        window = self.data[idx].long()
        return window[:, :-1], window[:, 1:]


def held_out_batches(
    data: torch.Tensor, seq_len: int, n_batches: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of evaluation batches (same on every member)."""
    stream = ByteStream(data, seq_len, seed=1234)
    return [stream.batch(batch_size) for _ in range(n_batches)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-byte cross-entropy (nats) over ``batches``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        logits = model(x)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    model.train(was_training)
    return total / max(1, len(batches))
