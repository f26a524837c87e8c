"""Several instances, one daily budget (PostgreSQL): the coordinator.

Every ``budget-actor serve`` on one PostgreSQL schema is an *instance* with an
id of its own (``--instance-id``, default host name and process id). The store
keeps, per day and instance, a *share* row (``budget_shares``): the exact sum
of that instance's journal rows, updated in the same transaction as the rows.
The global daily spend is the sum of the shares; see ``docs/scaling.md``.

The coordinator is a child task of the budget actor with a connection of its
own, so that it never waits behind the persister's writes. It does two things:

* **sync**: every ``sync_interval_s`` it reads the other instances' totals in
  one snapshot and sends them to the actor as :class:`Synced`. The actor adds
  its own live figures, so an instance's view of the global spend is at most
  one interval (plus a query, plus the others' commit latency) old.
* **admit**: an ``admit`` must reserve against the *global* cap atomically, so
  the actor hands it here and the store decides it under a per-day advisory
  lock (:meth:`SharedBudget.admit`, PostgreSQL's). The answer comes with fresh totals.

If the store cannot be reached, sync keeps the last view (health shows its
age in ``sync_age_s``) and ``admit`` is refused: an instance that cannot see
the others must not hand out budget that they may have spent.

Pending admissions live in a
:class:`~budget_actor.runtime.resumable.ResumableQueue`, which outlives a
restarted coordinator; a retried admission is harmless (it replaces its own reservation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

import trio

from ..core.config import BudgetConfig
from ..core.views import Admission
from ..stores.store import SharedBudget, StoreError
from .messages import Admit, Message, Synced
from .resumable import ResumableQueue
from .storecall import StoreTimeout, call_store

T = TypeVar("T")

log = logging.getLogger("budget_actor.shared")

# A store outage would otherwise log a failed sync five times a second.
FAILURE_LOG_EVERY_S = 10.0


class Coordinator:
    def __init__(
        self,
        store: SharedBudget,
        config: BudgetConfig,
        queue: ResumableQueue[Admit],
        day: Callable[[], str],
        report: Callable[[Message], Awaitable[None]],
    ) -> None:
        self.store = store
        self.config = config
        self.queue = queue
        self.day = day
        self.report = report
        # One query at a time on the coordinator's own connection.
        self.limiter = trio.CapacityLimiter(1)
        self._failed_at = -math.inf
        # A query abandoned at cancellation may still run in its thread.
        self._abandoned = False

    async def run(self) -> None:
        """Sync and admit until cancelled. Store errors are handled here (logged,
        retried next interval; an admission is refused), so only a bug restarts
        the coordinator. Cancellation does not wait for a query in flight (a
        partitioned database must not hold up a shutdown); its thread is
        abandoned with the connection, which is otherwise closed at the end."""
        try:
            await self._run()
        finally:
            if not self._abandoned:
                self.store.close()

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the coordinator's thread (see
        :func:`.storecall.call_store`). Raises :class:`StoreError`, also when
        the store has not answered within ``store_timeout_s`` (a server that
        accepts and never answers), so that an ``admit`` is refused within
        seconds instead of waiting."""
        self._abandoned = True  # until the thread is known to have finished
        try:
            result = await call_store(
                self.store,
                fn,
                *args,
                limiter=self.limiter,
                timeout_s=self.config.store_timeout_s,
            )
        except (trio.Cancelled, StoreTimeout):
            raise  # the thread may still run: leave the connection to it
        except BaseException:
            self._abandoned = False  # the thread has finished, with an error
            raise
        self._abandoned = False
        return result

    async def _run(self) -> None:
        queue = self.queue
        next_sync = trio.current_time()
        while True:
            admit: Admit | None = None
            with trio.move_on_at(next_sync):
                admit = await queue.next()
            if admit is not None:
                await self._admit(admit)
                queue.done()
            else:
                await self._sync()
            next_sync = trio.current_time() + self.config.sync_interval_s

    async def _sync(self) -> None:
        at = trio.current_time()
        try:
            others = await self._call(self.store.others, self.day())
        except StoreError as exc:
            self._log_failure("sync", exc)
            return
        await self.report(Synced(others, at))

    async def _admit(self, admit: Admit) -> None:
        at = trio.current_time()
        try:
            admission, others = await self._call(
                self.store.admit,
                self.day(),
                admit.dispatch_id,
                admit.estimate,
                self.config.daily_cap,
                self.config.reservation_ttl_s,
            )
        except StoreError as exc:
            self._log_failure("admit", exc)
            admit.reply.set(
                Admission(
                    dispatch_id=admit.dispatch_id,
                    allowed=False,
                    remaining=Decimal(0),
                    reason=f"the shared budget cannot be checked: {exc}",
                )
            )
            return
        admit.reply.set(admission)
        await self.report(Synced(others, at))

    def _log_failure(self, what: str, exc: StoreError) -> None:
        now = trio.current_time()
        if now - self._failed_at >= FAILURE_LOG_EVERY_S:
            self._failed_at = now
            log.warning("%s against the shared budget failed: %s", what, exc)
