"""Dedupe: the window in which a ``dispatch_id`` counts once, and the bounded
cache of recent ids that answers most duplicates without asking the store.

**The window.** A ``dispatch_id`` counts once within its day and the days
next to it: a cost counted at 23:59:59 and resent at 00:00:01 (its ack was
lost) is a duplicate, acknowledged with the original ``seq``, and stays in
the day in which it was first counted. The stores enforce this with their
unique keys (see :func:`day_number` and ``docs/architecture.md``), so it holds
across restarts and instances; the ledger only needs to know recent ids.

**The cache** (:class:`RecentIds`) holds the ids that this ledger counted, or
learnt from the store, on the current and the previous day, up to a fixed
number: memory stays flat however many costs a day brings. An id in the cache
is a duplicate at once (its ack waits only for the original to be durable).
An id not in the cache is counted, and the store, whose unique key is the
authority, may refuse it; the persister then reports the original's ``seq``
and the ledger takes the cost back out (:meth:`~.ledger.Ledger.uncount`).

Pure: no trio, no I/O.
"""

from __future__ import annotations

from collections import deque
from datetime import date, timedelta

# Ids kept in memory, today's and yesterday's together. About 130 bytes each
# (the id string, its seq and a dict slot): 100,000 ids cost ~13 MB whatever
# the day's volume, and cover the last 20 s even at 5,000 costs/s, far more
# than a dispatcher needs to resend a cost whose ack it lost. A resend older
# than that is still a duplicate; it costs one refused row in the store.
DEFAULT_DEDUPE_CACHE = 100_000

# Day numbers count from here; any fixed date works (the stores use the same).
_EPOCH = date(2000, 1, 1)


def day_number(day: str) -> int:
    """Days since 2000-01-01 of a ``YYYY-MM-DD`` budget day.

    The stores key the journal by ``(day_number // 2, dispatch_id)`` and by
    ``((day_number + 1) // 2, dispatch_id)``, both unique: any two adjacent
    days share one of the two pairs, so the same id on today and yesterday
    collides in one key, while days two apart share none.
    """
    return (date.fromisoformat(day) - _EPOCH).days


def neighbours(day: str) -> tuple[str, str]:
    """The days before and after ``day`` (``YYYY-MM-DD``)."""
    d = date.fromisoformat(day)
    return (d - timedelta(days=1)).isoformat(), (d + timedelta(days=1)).isoformat()


class RecentIds:
    """The ids of the current and the previous day that are still in memory:
    ``dispatch_id -> seq`` of the cost that counted it, at most ``capacity``
    of them together.

    When full, the oldest id goes first (yesterday's before today's; within a
    day, in the order they came). Forgetting is always safe: the store still
    refuses the id. ``capacity`` 0 keeps nothing (every duplicate is then
    decided by the store).
    """

    __slots__ = ("_previous", "_today", "capacity")

    def __init__(self, capacity: int = DEFAULT_DEDUPE_CACHE) -> None:
        if capacity < 0:
            raise ValueError("the dedupe cache capacity must not be negative")
        self.capacity = capacity
        self._today = _Generation()
        self._previous = _Generation()

    def __len__(self) -> int:
        return len(self._today.ids) + len(self._previous.ids)

    def get(self, dispatch_id: str) -> int | None:
        """The seq that counted ``dispatch_id`` today or yesterday, if known."""
        seq = self._today.ids.get(dispatch_id)
        if seq is None:
            seq = self._previous.ids.get(dispatch_id)
        return seq

    def counted_yesterday(self, dispatch_id: str) -> bool:
        """True if ``dispatch_id`` is known, and from yesterday, not today."""
        return dispatch_id not in self._today.ids and dispatch_id in self._previous.ids

    def add(self, dispatch_id: str, seq: int, *, yesterday: bool = False) -> None:
        """Remember ``dispatch_id`` as counted by ``seq`` today (or yesterday)."""
        if self.capacity == 0:
            return
        generation, other = (
            (self._previous, self._today) if yesterday else (self._today, self._previous)
        )
        # One answer per id: the store's word on an id this ledger counted
        # today (found counted yesterday) replaces today's own seq.
        other.ids.pop(dispatch_id, None)
        if dispatch_id not in generation.ids:
            generation.order.append(dispatch_id)
        generation.ids[dispatch_id] = seq
        while len(self._today.ids) + len(self._previous.ids) > self.capacity:
            oldest = self._previous if self._previous.ids else self._today
            # (An id forgotten since it came may still be in the order.)
            oldest.ids.pop(oldest.order.popleft(), None)

    def forget(self, dispatch_id: str, seq: int) -> None:
        """Forget ``dispatch_id`` if ``seq`` counted it: that cost was taken
        back out (never made durable), and its resend must count."""
        for generation in (self._today, self._previous):
            if generation.ids.get(dispatch_id) == seq:
                del generation.ids[dispatch_id]

    def next_day(self, *, adjacent: bool = True) -> None:
        """The day rolled over: today's ids become yesterday's, and the day
        before yesterday's leave the window. ``adjacent=False`` (the clock
        jumped more than a day) forgets everything."""
        self._previous = self._today if adjacent else _Generation()
        self._today = _Generation()


class _Generation:
    """One day's ids, with their arrival order for eviction. (A dict alone
    would do, but deleting its first key again and again makes finding the
    next first key slower and slower until the dict is rebuilt.)"""

    __slots__ = ("ids", "order")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.order: deque[str] = deque()
