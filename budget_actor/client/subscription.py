"""A subscriber's view of the spend: latest value, alerts never skipped.

The client fills every live :class:`Subscription` from its one connection;
the subscriber drains it at its own pace. Consecutive ``spend`` states
collapse into the newest (a slow reader skips intermediate states but ends on
the newest one); alerts are kept, in order, between them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from types import TracebackType

import anyio

from ..core.views import Spend, Update


class Subscription:
    """An async iterator of :class:`Spend` and :class:`AlertNotice` updates.

    Made by :meth:`BudgetClient.subscribe`. It starts with the current spend
    and subscribes again by itself after every reconnect (starting again with
    the then current spend). It ends when the client closes, and raises the
    client's error if the client stops on one (for example
    :class:`~budget_actor.client.Unauthorized`). Alerts pushed while the
    client was disconnected are not replayed (``health().alerts_sent`` lists
    the day's). Dropping it (or :meth:`aclose`) stops the deliveries.
    """

    def __init__(self, register: Callable[[Subscription], None]) -> None:
        self._register: Callable[[Subscription], None] | None = register
        self._updates: collections.deque[Update] = collections.deque()
        self._wake: anyio.Event | None = None
        self._ended: BaseException | None = None
        self._closed = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Update:
        if self._register is not None:
            register, self._register = self._register, None
            register(self)
        while not self._updates:
            if self._closed:
                raise StopAsyncIteration
            if self._ended is not None:
                raise self._ended
            self._wake = anyio.Event()
            await self._wake.wait()
        return self._updates.popleft()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop receiving updates; iteration ends."""
        self._closed = True
        self._updates.clear()
        self._poke()

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, update: Update) -> None:
        """From the client: one update (never blocks)."""
        if self._closed:
            return
        if isinstance(update, Spend) and self._updates and isinstance(self._updates[-1], Spend):
            self._updates[-1] = update  # latest value
        else:
            self._updates.append(update)
        self._poke()

    def end(self, error: BaseException | None) -> None:
        """From the client: no more updates; ``error`` is raised to the reader
        once it has read what was delivered (None: iteration simply ends)."""
        if error is None:
            self._closed = True
        else:
            self._ended = error
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None
