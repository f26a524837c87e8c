"""A work queue that outlives its consumer: a restarted child resumes the item
its failed predecessor was working on.

The actor owns one per child that takes work from it (the alerter's alerts,
the coordinator's admissions). :meth:`ResumableQueue.put` never blocks, so the
actor never waits for a child. The consumer takes an item with
:meth:`~ResumableQueue.next`, which stays *current* until
:meth:`~ResumableQueue.done`: if the consumer fails in between, its
supervisor restarts it, and the next :meth:`~ResumableQueue.next` hands it the
same item again. Work is therefore done at least once, so each consumer's work
must be harmless to repeat (a nudge row is inserted once by name; an admission
replaces its own reservation).
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class ResumableQueue(Generic[T]):
    """Unbounded FIFO with one item in progress; see the module docstring."""

    def __init__(self) -> None:
        # Unbounded on purpose: the actor must never block on a child; the
        # work that arrives here is rare (alerts, admissions).
        self._send, self._recv = trio.open_memory_channel[T](math.inf)
        self._current: T | None = None

    def put(self, item: T) -> None:
        """Queue ``item``; never blocks."""
        self._send.send_nowait(item)

    async def next(self) -> T:
        """The item in progress, or else wait for the next one and make it so.

        Cancellation while waiting takes nothing off the queue.
        """
        if self._current is None:
            self._current = await self._recv.receive()
        return self._current

    def done(self) -> None:
        """The item in progress is finished; :meth:`next` moves on."""
        self._current = None

    def pending(self) -> list[T]:
        """Take every unfinished item, the one in progress first, leaving the
        queue empty (at shutdown: to flush them or fail their waiters)."""
        items = [] if self._current is None else [self._current]
        self._current = None
        while True:
            try:
                items.append(self._recv.receive_nowait())
            except trio.WouldBlock:
                return items
