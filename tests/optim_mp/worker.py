"""One training process of the multi-process optimizer tests.

``run_worker(spec, conn, socket, log_path)`` is the body of a process forked
by the harness (from a forkserver that already imported torch, see
``preload.py``). It talks to the daemon at ``socket`` through
``peerd.connect()``, trains with ``examples.train_diloco.train_worker`` and
sends one dict per event over ``conn``:

* ``{"event": "ready"}`` once started;
* ``{"event": "connected", "peer": ...}`` per job: this member's peer id;
* ``{"event": "joined", ...}`` (joiners only): the shared state it received,
  reported at its first inner step (before its first outer round);
* ``{"event": "outer", ...}`` after every outer round: outer step counter,
  global inner step, held-out loss of the model, BLAKE2b of the shared state
  (counters excluded: they are reported as numbers) and of the parameters,
  the round's participants and the bytes its shared-state sync had to download
  (0 when the members were already bit-identical before the sync);
* ``{"event": "held", ...}`` after global inner step ``hold_at`` (and its
  round, if one ends there): the worker then blocks until the test sends a
  message, or kills it there, at a named phase of the run;
* ``{"event": "done", ...}`` after each job, ``{"event": "finished"}`` at the
  end, or ``{"event": "error", ...}``.

The spec is ``{"index": i, "jobs": [job, ...]}``; the worker trains one job
(run) after the other in the same process. Job keys: run, method, steps,
sync_every, and optionally join (bool), hold_at (global inner step), outer
(optimizer kwargs), moe (bool).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

import peerd
from examples.data import evaluate, held_out_batches, load_corpus
from examples.tiny_gpt import GPTConfig
from examples.tiny_moe import MoEConfig
from examples.train_diloco import TrainConfig, train_worker
from optim import OuterLoop

JOIN_TIMEOUT = 60.0  # seconds a joiner waits to be admitted at a round boundary
CONTROL_TIMEOUT = 60.0

BASE = TrainConfig(
    batch_size=8, lr=3e-3, warmup=2, weight_decay=0.1,
    model=GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=32),
    moe=MoEConfig(n_layer=1, n_head=2, d_model=32, seq_len=32, n_experts=4, expert_hidden=32),
    eval_batches=2, train_bytes=100_000, eval_bytes=10_000,
)


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b over the name-sorted raw bytes of every tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


Emit = Callable[..., None]


def state_fields(outer: OuterLoop) -> dict[str, Any]:
    shared = {k: v for k, v in outer.shared_state().items() if k != "counters"}
    return {"outer_step": outer.outer_steps, "global_step": outer.global_step,
            "state": digest(shared), "params": digest(dict(outer.model.named_parameters()))}


def warm() -> None:
    """Pay the start-up costs every worker shares (imports, the corpus) once."""
    # The first torch optimizer imports torch._dynamo (~2 s of CPU).
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    load_corpus(BASE.train_bytes, BASE.eval_bytes)


def train_job(job: dict[str, Any], index: int, emit: Emit, wait: Callable[[], None]) -> None:
    """One run: ``job`` holds run, method, steps, sync_every and optionally outer, moe,
    join, hold_at. Every event names the run."""
    cfg = replace(BASE, method=job["method"], steps=job["steps"], sync_every=job["sync_every"],
                  use_moe=job.get("moe", False), outer=job.get("outer", {}))
    moe = cfg.use_moe or cfg.method == "spes"
    seq_len = (cfg.moe if moe else cfg.model).seq_len
    # The corpus is cached before joining, so admitted members never wait on it.
    _, held = load_corpus(cfg.train_bytes, cfg.eval_bytes)
    batches = held_out_batches(held, seq_len, cfg.eval_batches, 8)
    run, joining, hold_at = job["run"], bool(job.get("join")), job.get("hold_at")
    reported = {"joined": False}

    def hook(step: int, outer: OuterLoop | None) -> None:
        assert outer is not None
        if joining and not reported["joined"]:
            reported["joined"] = True
            emit("joined", run=run, **state_fields(outer))  # an inner step leaves theta as is
        last = outer.records[-1] if outer.records else None
        if last is not None and last.step == outer.global_step:
            emit("outer", run=run, **state_fields(outer), loss=evaluate(outer.model, batches),
                 participants=list(last.participants), skipped=last.skipped,
                 sync_bytes_received=last.sync_bytes_received)
        if outer.global_step == hold_at:
            emit("held", run=run, outer_step=outer.outer_steps, global_step=hold_at)
            wait()

    with peerd.connect(run=run, timeout=CONTROL_TIMEOUT) as client:
        emit("connected", run=run, peer=client.peer_id)
        if joining:
            emit("joining", run=run)
            view = client.join(timeout=JOIN_TIMEOUT)
            emit("admitted", run=run, revision=view.revision, members=list(view.members))
        result = train_worker(client, cfg, worker=index, joining=joining, hook=hook)
    emit("done", run=run, member=result.member, rounds=result.rounds,
         train_loss_start=result.train_loss_start, train_loss_end=result.train_loss_end,
         held_out_loss=result.held_out_loss)


def run_worker(spec: dict[str, Any], conn: Any, socket: str, log_path: str) -> None:
    """Process body: run ``spec``'s jobs against the daemon at ``socket``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["PEERD_SOCKET"] = socket  # so plain peerd.connect() finds our daemon
    torch.set_num_threads(1)

    def emit(event: str, **fields: Any) -> None:
        conn.send({"event": event, "t": time.time(), **fields})

    def wait() -> None:
        try:
            conn.recv()
        except EOFError:  # the test is gone
            os._exit(3)

    warm()  # a no-op when forked from a warm forkserver
    emit("ready")
    try:
        for job in spec["jobs"]:
            train_job(job, spec["index"], emit, wait)
    except Exception as exc:
        emit("error", kind=type(exc).__name__, message=str(exc),
             trace=traceback.format_exc()[-2000:])
        sys.exit(1)
    emit("finished")
