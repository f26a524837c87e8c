"""The resumable queue: what a failed child was working on is not lost."""

from __future__ import annotations

import pytest
import trio

from budget_actor.runtime.resumable import ResumableQueue


async def test_a_restarted_consumer_gets_the_unfinished_item_again() -> None:
    queue: ResumableQueue[str] = ResumableQueue()
    queue.put("a")
    queue.put("b")

    async def failing_consumer() -> None:
        assert await queue.next() == "a"
        raise RuntimeError("crashed before done()")

    with pytest.raises(RuntimeError):
        await failing_consumer()
    assert await queue.next() == "a"  # resumed, not skipped
    queue.done()
    assert await queue.next() == "b"


async def test_cancelled_waiting_takes_nothing() -> None:
    queue: ResumableQueue[int] = ResumableQueue()
    with trio.move_on_after(0.01):
        await queue.next()
    queue.put(1)
    assert await queue.next() == 1


async def test_pending_takes_everything_unfinished_in_order() -> None:
    queue: ResumableQueue[int] = ResumableQueue()
    for n in (1, 2, 3):
        queue.put(n)
    assert await queue.next() == 1
    assert queue.pending() == [1, 2, 3]
    assert queue.pending() == []
    queue.put(4)
    assert await queue.next() == 4
