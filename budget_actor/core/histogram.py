"""A cumulative histogram of durations, as Prometheus exposes them (pure).

Observing is one binary search over a handful of bounds and two additions,
and :meth:`Histogram.observe` takes a count, so that a batch of values that
are equal (the costs acknowledged by one group commit, counted in one
wake-up of the actor) costs one observation, not one per value.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds. Group commit makes an ack a matter of milliseconds on a healthy
# store; an outage or a hung store makes it seconds. Spanning 0.5 ms to 10 s
# keeps both in view with the few buckets a dashboard can read.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Counts of observed values per bucket (upper bounds ``bounds``, plus
    one for everything above the last), their number and their sum."""

    __slots__ = ("_counts", "bounds", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` ``times`` times. A negative value (a clock that
        went backwards) counts as 0."""
        value = max(value, 0.0)
        # Prometheus buckets are "less than or equal": bisect_left finds the
        # first bound >= value.
        self._counts[bisect_left(self.bounds, value)] += times
        self.count += times
        self.sum += value * times

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values at or below it)`` per bucket, the last
        bound being infinity (its count is :attr:`count`)."""
        result: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            running += count
            result.append((bound, running))
        return result
