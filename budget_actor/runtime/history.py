"""Reads the spend history (``GET /history``) from the store, for observers.

It has a store connection and a worker thread of its own (one at a time,
under its own ``CapacityLimiter``), so reading a year of history never makes
the persister, and so a dispatcher's ack, wait. What it read is kept: past
days for :data:`PAST_CACHE_S` (they change only when a late spill file is
drained into them), and today's per-minute curve for good, brought up to date
on each read with only the journal rows written since (PostgreSQL sums the
day's minutes in the database each time instead).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TypeVar

import trio

from ..core.config import BudgetConfig
from ..core.history import (
    MAX_DAYS,
    Curve,
    DayTotal,
    History,
    HistoryDay,
    day_start,
    last_days,
)
from ..core.views import Health
from ..stores.store import Store
from .storecall import call_store

# Past days are final but for a spill file drained late (an instance that
# restarts after an outage across midnight): a few minutes of staleness is
# the price of not re-reading up to a year of journal on every page load.
PAST_CACHE_S = 300.0

T = TypeVar("T")


class HistoryReader:
    def __init__(self, store: Store, config: BudgetConfig) -> None:
        self.store = store
        self.config = config
        self._limiter = trio.CapacityLimiter(1)
        # day -> (trio time read, its totals or None when the store has none)
        self._past: dict[str, tuple[float, DayTotal | None]] = {}
        self._curve: Curve | None = None

    async def read(self, days: int, health: Health) -> History:
        """The last ``days`` days ending with ``health.day`` (whose figures,
        live from the actor, are today's entry) and today's curve.

        Raises :class:`~budget_actor.stores.store.StoreError` when the store
        cannot be read, or has not answered within the configured
        ``store_timeout_s`` (see :mod:`.storecall`); cancellation abandons a
        query in progress.
        """
        today = health.day
        wanted = last_days(today, days)
        now = trio.current_time()
        stale = [
            day
            for day in wanted[:-1]
            if day not in self._past or now - self._past[day][0] > PAST_CACHE_S
        ]
        if stale:
            totals = await self._call(self.store.day_totals, stale[0], stale[-1])
            for day in stale:
                self._past[day] = (now, totals.get(day))
        keep = set(last_days(today, MAX_DAYS))
        for day in [day for day in self._past if day not in keep]:
            del self._past[day]

        curve = self._curve
        if curve is None or curve.day != today:
            curve = self._curve = Curve(today)
        await self._call(self.store.fold_curve, curve)

        cap = self.config.daily_cap
        history = []
        for day in wanted[:-1]:
            total = self._past[day][1]
            if total is None:
                history.append(
                    HistoryDay(day=day, daily_spend=Decimal(0), dispatches=0, daily_cap=cap)
                )
            else:
                history.append(
                    HistoryDay(
                        day=day,
                        daily_spend=total.spend,
                        dispatches=total.dispatches,
                        daily_cap=total.cap if total.cap is not None else cap,
                    )
                )
        history.append(
            HistoryDay(
                day=today,
                daily_spend=health.daily_spend,
                dispatches=health.dispatches,
                daily_cap=health.daily_cap,
            )
        )
        return History(
            days=history,
            today=curve.points(),
            today_start=day_start(today, self.config.zone),
        )

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await call_store(
            self.store,
            fn,
            *args,
            limiter=self._limiter,
            timeout_s=self.config.store_timeout_s,
        )

    def close(self) -> None:
        self.store.close()
