"""A store call from trio with a deadline: for the children that read or
write on a connection of their own (the coordinator, history, alert
webhooks).

The store's API is synchronous (psycopg's async API is asyncio-only), so the
call runs in a worker thread under the caller's ``CapacityLimiter``. A
database that accepts connections and then never answers would hold that
thread, and whoever waits on it, for good: past the deadline the call is
abandoned instead, the store interrupted (its connection closed under the
thread, which then fails), and :class:`~budget_actor.stores.store.StoreError`
raised, the same error as for a refused connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from ..stores.store import StoreError

T = TypeVar("T")


class Interruptible(Protocol):
    """What a deadline needs of a store: its name, and a way to make the
    call it abandons fail (:meth:`Store.interrupt`)."""

    kind: str

    def interrupt(self) -> None: ...


class StoreTimeout(StoreError):
    """The store did not answer in time; the call's thread may still be
    running on the connection (until the interrupt fails it)."""


async def call_store(
    store: Interruptible,
    fn: Callable[..., T],
    *args: object,
    limiter: trio.CapacityLimiter,
    timeout_s: float,
) -> T:
    """``fn(*args)`` in a worker thread under ``limiter``.

    Raises what ``fn`` raises, and :class:`StoreTimeout` (a
    :class:`StoreError`) when it has not answered within ``timeout_s``. An
    abandoned thread keeps ``limiter`` until it ends, so the next call on
    the same connection waits for the interrupted one to fail, never runs
    beside it. Cancellation abandons the thread the same way, without
    interrupting the store.
    """
    with trio.move_on_after(timeout_s):
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
    store.interrupt()
    raise StoreTimeout(f"{store.kind}: no answer within {timeout_s:g}s")
