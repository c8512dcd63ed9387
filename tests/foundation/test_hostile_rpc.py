"""A swarm member sending garbage to every RPC method a node serves: each call
ends in an answer or a clear error, and the node, its session and its run
are as before. (Members are authenticated, not trusted: a buggy or hostile
one must not take others down.)"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import trio

from peerd.errors import PeerdError
from peerd.identity import SwarmKey
from peerd.node import open_node

KEY = SwarmKey(b"h" * 32)
RUN = "hostile"
# Retiring is what this method does to the caller's own session; the node
# answers it once the session has drained (tests/foundation/test_node_net.py).
SKIP = {"peerd.session.retire"}


def garbage(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.getrandbits(64) - (1 << 63)
    if kind == 1:
        return rng.randbytes(rng.randrange(40))
    if kind == 2:
        return "x" * rng.randrange(20)
    if kind == 3:
        return None
    if kind == 4:
        return rng.random()
    if kind == 5:
        return rng.random() < 0.5
    if kind == 6:
        return [garbage(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        return {str(i): garbage(rng, depth + 1) for i in range(rng.randrange(4))}
    return rng.randrange(1 << 16)


def payload(rng: random.Random, i: int) -> bytes:
    if i % 3 == 0:
        return rng.randbytes(rng.randrange(200))  # not even msgpack
    if i % 3 == 1:
        return msgpack.packb(garbage(rng), use_bin_type=True)
    # Shaped like a wire message: a type tag, then fields of any type.
    fields = [garbage(rng) for _ in range(rng.randrange(8))]
    return msgpack.packb([rng.randrange(200), *fields], use_bin_type=True)


async def test_garbage_to_every_method_leaves_node_session_and_run_whole() -> None:
    rng = random.Random(20)
    async with open_node(KEY) as a, open_node(KEY) as b:
        await b.join_run(RUN, [b.peer_id.text])
        view = b.view(RUN)
        await a.connect(b.listen_address)
        session = a.session(b.peer_id)
        methods = sorted(set(b._registry._handlers) - SKIP)
        assert f"c.collectives/{RUN}/join" in methods and "dht/1/store" in methods
        answered = 0
        for i in range(40 * len(methods)):
            method = methods[i % len(methods)]
            with trio.fail_after(10):
                try:
                    await a.call(b.peer_id, method, payload(rng, i), timeout=5)
                    answered += 1
                except PeerdError:
                    pass  # refused, with a message: what garbage should get
            assert session.alive, f"the session died after garbage to {method}"
        assert answered < 40 * len(methods)  # garbage was refused, not all taken
        assert b.view(RUN) == view
        assert b.statistics().peers == 1
        assert await a.call(b.peer_id, "peerd.nat.info")
