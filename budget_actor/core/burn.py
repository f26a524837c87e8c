"""Burn rate and end-of-day projection (pure).

The ledger feeds every change of the day's spend to a :class:`BurnRate`,
which keeps the cumulative spend sampled in :data:`BUCKET_S` buckets over the
last :data:`HISTORY_S` seconds: at most 360 numbers, whatever the traffic. A
rate over a window is the spend added in the window divided by its length; the
window is cut at the start of the history (day start, or the restore of a
running day), and never shorter than :data:`MIN_WINDOW_S`, so that the first
cost of the day does not read as an infinite rate.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from decimal import Decimal

from .money import RATIO_CONTEXT

# Ten-second buckets: fine enough for a 5-minute rate, coarse enough that a
# flood of costs touches one number.
BUCKET_S = 10.0
# The longest window asked for (the 60-minute rate), plus one bucket.
HISTORY_S = 3600.0 + BUCKET_S
# A window shorter than this is stretched to it.
MIN_WINDOW_S = 60.0
_HOUR = Decimal(3600)
_MICRO = Decimal("0.000001")


class BurnRate:
    def __init__(self, start: datetime, spend: Decimal) -> None:
        # The spend known at a moment before every sample: the start of the
        # history, later the end of the newest bucket dropped from it.
        self._base = (start.timestamp(), spend)
        self._origin = start.timestamp()
        # (bucket start, cumulative spend at the end of that bucket)
        self._samples: deque[tuple[float, Decimal]] = deque()

    def observe(self, at: datetime, spend: Decimal) -> None:
        """The day's cumulative spend is ``spend`` at ``at``."""
        t = at.timestamp()
        bucket = t - t % BUCKET_S
        samples = self._samples
        if samples and samples[-1][0] >= bucket:
            samples[-1] = (samples[-1][0], spend)
            return
        samples.append((bucket, spend))
        while samples[0][0] + BUCKET_S < t - HISTORY_S:
            old_start, old_spend = samples.popleft()
            self._base = (old_start + BUCKET_S, old_spend)

    def rate(self, now: datetime, window_s: float) -> Decimal:
        """USD per hour over the last ``window_s`` seconds."""
        t = now.timestamp()
        start = max(t - window_s, self._origin)
        before = self._base[1]
        latest = before
        for bucket, spend in self._samples:
            if bucket + BUCKET_S <= start:
                before = spend  # this bucket ended before the window opened
            latest = spend
        added = latest - before
        seconds = max(t - start, MIN_WINDOW_S)
        per_hour = RATIO_CONTEXT.divide(RATIO_CONTEXT.multiply(added, _HOUR), Decimal(seconds))
        return max(per_hour, Decimal(0)).quantize(_MICRO, context=RATIO_CONTEXT)


def project(
    spend: Decimal, rate_per_hour: Decimal, now: datetime, day_ends_at: datetime
) -> Decimal:
    """The day's spend at midnight if it keeps burning at ``rate_per_hour``."""
    hours = Decimal(max((day_ends_at - now).total_seconds(), 0.0)) / _HOUR
    return RATIO_CONTEXT.add(spend, RATIO_CONTEXT.multiply(rate_per_hour, hours)).quantize(
        _MICRO, context=RATIO_CONTEXT
    )
