"""The capture barrier: a sync waits on it for the journal to hold every change made so far."""
from __future__ import annotations

import asyncio
import select

from engine.barrier import CaptureBarrier


def test_the_wait_ends_after_a_read_begun_since_and_the_two_journaler_rounds_begun_after_it() -> None:
    async def story() -> list[str]:
        barrier = CaptureBarrier()
        seen: list[str] = []
        before = barrier.pokes  # a read under way began before the wait
        barrier.round_started()  # and so did a journaler round
        waiting = asyncio.ensure_future(barrier.wait(idle=lambda: False))
        await asyncio.sleep(0)
        poked, _, _ = select.select([barrier.wake_fd], [], [], 5)
        seen.append("poked" if poked else "not poked")  # the capture thread is woken at once
        barrier.woken()
        steps = [("old read", lambda: barrier.captured(before)), ("new read", lambda: barrier.captured(barrier.pokes)),
                 ("old round", barrier.round_done), ("round", lambda: (barrier.round_started(), barrier.round_done())),
                 ("round", lambda: (barrier.round_started(), barrier.round_done()))]
        for name, step in steps:
            await asyncio.sleep(0.01)
            seen.append(f"{name}: {'done' if waiting.done() else 'waiting'}")
            step()
        async with asyncio.timeout(5):
            await waiting
        barrier.close()
        return seen

    assert asyncio.run(story()) == ["poked", "old read: waiting", "new read: waiting", "old round: waiting",
                                    "round: waiting", "round: waiting"]


def test_with_nothing_left_to_journal_no_round_is_waited_for() -> None:
    async def story() -> None:
        barrier = CaptureBarrier()
        waiting = asyncio.ensure_future(barrier.wait(idle=lambda: not barrier.flushing))
        await asyncio.sleep(0)
        barrier.captured(barrier.pokes)
        async with asyncio.timeout(5):
            await waiting
        barrier.close()

    asyncio.run(story())
