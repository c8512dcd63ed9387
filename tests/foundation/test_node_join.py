"""Joining a run on a real node while another join of the same run is under
way there (two training processes of one daemon joining at once)."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from collectives.api import AllReduceResult
from peerd.errors import Timeout
from peerd.identity import SwarmKey
from peerd.node import open_node

KEY = SwarmKey(b"j" * 32)
RUN = "joined-twice"


async def test_a_join_waiting_on_one_that_gives_up_starts_afresh_and_is_admitted() -> None:
    async with open_node(KEY) as founder, open_node(KEY) as joiner:
        await founder.join_run(RUN, [founder.peer_id.text])
        first_gave_up = trio.Event()
        results: dict[str, AllReduceResult] = {}
        arrays = {"founder": np.ones(5, np.float32), "joiner": np.full(5, 3.0, np.float32)}
        second: list[object] = []

        async def first() -> None:
            # Not connected to any member yet: nobody can admit it.
            with pytest.raises(Timeout, match="no peer is connected"):
                await joiner.join_run(RUN, timeout=1.0)
            first_gave_up.set()

        async def later() -> None:
            second.append(await joiner.join_run(RUN, timeout=60.0))
            results["joiner"] = await joiner.all_reduce(RUN, arrays["joiner"])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                while RUN not in joiner.runs():  # the first join's engine is up
                    await trio.sleep(0.01)
                nursery.start_soon(later)
                await first_gave_up.wait()
                # A member is reachable now: the waiting join, with time
                # left, can be admitted.
                await joiner.connect(founder.listen_address)
                # Joins take effect at a round boundary: one of the founder's
                # next boundaries admits the waiting joiner.
                while joiner.peer_id.text not in founder.view(RUN).members:
                    await founder.engine(RUN).update_view()
                    await trio.sleep(0.05)  # a training step, between rounds
                results["founder"] = await founder.all_reduce(RUN, arrays["founder"])
        (engine,) = second
        assert engine is joiner.engine(RUN)
        both = {founder.peer_id.text, joiner.peer_id.text}
        assert set(joiner.view(RUN).members) == both
        for who in ("founder", "joiner"):
            assert set(results[who].participants) == both
            assert np.array_equal(arrays[who], np.full(5, 2.0, np.float32))
