"""``GET /history``, the pure part: the answer's shape and today's curve.

The answer holds the last ``N`` budget days, oldest first and today last,
each with its spend, dispatches and cap, and ``today``: the day's cumulative
spend at most once a minute, from the journal, for the live page to draw the
whole day's curve whatever the moment it was opened.

:class:`Curve` folds journal rows into minutes incrementally, so a reader can
keep one and feed it only the rows written since its last look.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec

from .money import add, to_wire

DEFAULT_DAYS = 30
# A year and a day: enough for "the same day last year" on any day.
MAX_DAYS = 366


class HistoryDay(msgspec.Struct, frozen=True, kw_only=True):
    day: str
    daily_spend: Decimal
    dispatches: int
    daily_cap: Decimal


class HistoryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """The cumulative spend of the day at ``t``: the time of the last cost
    of that minute."""

    t: datetime
    daily_spend: Decimal


class History(msgspec.Struct, frozen=True, kw_only=True):
    days: list[HistoryDay]
    today: list[HistoryPoint]
    # Ours: when today began (midnight in the configured time zone), so that
    # a chart of today can start there.
    today_start: datetime

    def json(self) -> bytes:
        """The JSON answer, amounts as strings in plain notation (as on the
        WebSocket: never an exponent), times in ISO 8601 UTC."""
        return _encoder.encode(
            {
                "days": [
                    {
                        "day": d.day,
                        "daily_spend": to_wire(d.daily_spend),
                        "dispatches": d.dispatches,
                        "daily_cap": to_wire(d.daily_cap),
                    }
                    for d in self.days
                ],
                "today": [
                    {"t": p.t.astimezone(UTC), "daily_spend": to_wire(p.daily_spend)}
                    for p in self.today
                ],
                "today_start": self.today_start.astimezone(UTC),
            }
        )


_encoder = msgspec.json.Encoder()


class DayTotal(msgspec.Struct, frozen=True):
    """One past day as the store knows it (cap None: no budget patch)."""

    spend: Decimal
    dispatches: int
    cap: Decimal | None


def parse_days(values: list[str] | None) -> int:
    """The ``days`` query parameter: absent means :data:`DEFAULT_DAYS`.
    Raises ``ValueError`` with a message for the client."""
    if not values:
        return DEFAULT_DAYS
    if len(values) > 1:
        raise ValueError("give `days` once")
    text = values[0]
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_DAYS):
        raise ValueError(f"`days` must be an integer from 1 to {MAX_DAYS}")
    return int(text)


def day_start(day: str, zone: ZoneInfo) -> datetime:
    """Midnight at the start of ``day`` in ``zone``."""
    return datetime.combine(date.fromisoformat(day), time(0), tzinfo=zone)


def last_days(today: str, count: int) -> list[str]:
    """The ``count`` days ending with ``today``, oldest first (``YYYY-MM-DD``)."""
    end = date.fromisoformat(today)
    return [(end - timedelta(days=back)).isoformat() for back in range(count - 1, -1, -1)]


class Curve:
    """Today's journal rows, summed per minute, exactly.

    ``through_seq`` is the highest journal seq folded in (for stores whose
    seq orders the rows, to read only newer ones next time).
    """

    def __init__(self, day: str) -> None:
        self.day = day
        self.through_seq = 0
        # minute -> (time of its last cost, spend in that minute)
        self._minutes: dict[datetime, tuple[datetime, Decimal]] = {}

    def add(self, rows: Iterable[tuple[datetime, Decimal]]) -> None:
        """Fold in costs (when, amount)."""
        minutes = self._minutes
        for at, usd in rows:
            minute = at.replace(second=0, microsecond=0)
            seen = minutes.get(minute)
            if seen is None:
                minutes[minute] = (at, usd)
            else:
                minutes[minute] = (max(seen[0], at), add(seen[1], usd))

    def replace(self, minutes: Iterable[tuple[datetime, Decimal]]) -> None:
        """Start over from per-minute totals (time of the minute's last
        cost, its spend), as a store that sums them itself returns them.

        The new minutes replace the old ones at once, when all are read:
        this runs in a worker thread, and another request may read
        :meth:`points` meanwhile (it gets the old curve, never half of the
        new one)."""
        fresh: dict[datetime, tuple[datetime, Decimal]] = {}
        for last, usd in minutes:
            fresh[last.replace(second=0, microsecond=0)] = (last, usd)
        self._minutes = fresh

    def points(self) -> list[HistoryPoint]:
        """The cumulative spend after each minute with costs, in time order."""
        total = Decimal(0)
        points = []
        for minute in sorted(self._minutes):
            last, usd = self._minutes[minute]
            total = add(total, usd)
            points.append(HistoryPoint(t=last, daily_spend=total))
        return points
