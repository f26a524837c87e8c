"""Fan-out: spend states and alerts to subscribers, never ahead of costs.

Work for a dispatcher (its frames, the actor, persisting, acks) keeps
priority over pushes to observers. Three rules make it so:

* **The actor does no per-subscriber work for a spend state.** After a batch
  it puts the newest state in one slot (:meth:`Fanout.publish`: O(1), no
  encoding, no wake-ups beyond the fan-out task).
* **One task releases states, paced by load** (:meth:`Fanout.run`). It
  encodes each released state once (JSON bytes that every subscriber
  shares). While costs flow (the spend keeps changing), it releases the
  newest state only once the observers' push work for the previous one
  (which the server reports with :meth:`Fanout.charge`) is at most
  :data:`BUSY_SHARE` of the event loop's own CPU time for everything else
  since then, and at least every :data:`MAX_GAP_S`. Once the spend has
  stopped changing for :data:`QUIET_S`, the newest state goes out at once.
  Never more than one state per :data:`MIN_GAP_S`, and pushes never take
  more than :data:`WALL_SHARE` of the time. When busy, subscribers get
  fewer, newer states; costs never wait for them.
* **Alerts are never skipped.** Each subscription keeps its own ordered queue
  of alerts, offered by the actor (a handful per day). A subscriber that lets
  :data:`MAX_PENDING_ALERTS` pile up is not reading at all: its subscription
  is closed (``overflowed``) and its owner closes the connection, rather than
  dropping an alert silently.

A subscription is either *paced* (the in-process API: the fan-out task wakes
it on every released state and :meth:`Subscription.next` hands it out) or
served by its owner (the WebSocket server, which writes every released state
to all its subscribers from one task of its own, see ``net/pushes.py``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import trio

from ..core.views import AlertNotice, Spend
from ..core.wire import encode

# Alerts are a handful per day (one per threshold); a subscriber that has let
# this many pile up is not reading at all. Past it the subscription is marked
# overflowed and its owner closes it, rather than silently dropping an alert.
MAX_PENDING_ALERTS = 256
# At most one released state per this interval (100 per second): a single
# change still goes out after at most this long, and a trickle of changes
# cannot make every subscriber wake up for each one.
MIN_GAP_S = 0.01
# While the spend keeps changing (costs flow), a state is released once the
# push work reported for the previous one is at most this share of the event
# loop's CPU time spent on everything else since. 1,000 WebSocket subscribers
# cost 15-80 ms per state on the 2-core machine; other per-subscriber costs
# (pings, the kernel's own work) come on top, so the share is kept small: a
# dispatcher kept 0.82 of its rate with 10% in one run, 0.84-0.85 with 5%.
BUSY_SHARE = 0.05
# ... but at least this often, however idle the loop: how stale a busy
# dashboard may get (when the loop is idle, the busy rule alone would hold a
# state back until enough other work had been done). At 0.5 s it overrode the
# busy rule on the loaded 2-core machine (a round for 1,000 subscribers took
# 30-55 ms there), and pushes took 20-40% of the loop.
MAX_GAP_S = 1.0
# The spend counts as settled once it has not changed for this long; the
# newest state is then released at once. This bounds how late the last state
# of a burst reaches subscribers. Longer than a commit (~10-20 ms), so that a
# dispatcher waiting for its acks does not count as settled.
QUIET_S = 0.05
# Whatever the load, pushes take at most this share of the wall time.
WALL_SHARE = 0.5
# How often a waiting state is looked at again while the spend keeps changing.
POLL_S = 0.01


class Published:
    """One spend state, shared by all subscribers, encoded at most once.

    ``number`` orders states: the fan-out gives each newly published state
    the next number, so a subscriber can tell newer from older.
    """

    __slots__ = ("_json", "number", "spend")

    def __init__(self, spend: Spend) -> None:
        self.spend = spend
        self.number = 0
        self._json: bytes | None = None

    def json(self) -> bytes:
        """The ``spend`` message as UTF-8 JSON, encoded on the first call."""
        if self._json is None:
            self._json = encode(self.spend)
        return self._json

    def frame(self) -> str:
        """The ``spend`` message as JSON text."""
        return self.json().decode()


class Subscription:
    """What one subscriber has not yet taken: the state at subscribe time,
    newer released states (paced subscriptions only) and its alerts.

    :meth:`next` waits for the next item: pending alerts first, in order,
    then the newest state not yet taken. It raises ``trio.EndOfChannel``
    once the subscription is closed and drained of alerts; ``overflowed``
    tells whether it closed because the subscriber stopped reading alerts.
    """

    def __init__(self, fanout: Fanout, *, paced: bool = True) -> None:
        self._fanout = fanout
        #: Woken by the fan-out task on every released state.
        self.paced = paced
        # The newest state when the actor took the subscription.
        self._first: Published | None = None
        # Number of the newest state handed out by next().
        self._taken = 0
        self._alerts: deque[AlertNotice] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.overflowed = False

    @property
    def first(self) -> Published:
        """The state at subscribe time; set before ``open_subscription`` returns."""
        assert self._first is not None, "not subscribed yet"
        return self._first

    # -- the actor's side (synchronous, never blocks) -------------------------

    def offer_alert(self, alert: AlertNotice) -> None:
        if self.closed:
            return
        if len(self._alerts) >= MAX_PENDING_ALERTS:
            self.overflowed = True
            self.close()
            return
        self._alerts.append(alert)
        self.wake()

    def close(self) -> None:
        self.closed = True
        self.wake()

    def wake(self) -> None:
        """Wake the subscriber's task if it waits in :meth:`wait`."""
        if self._lot:
            self._lot.unpark_all()

    # -- the subscriber's side -----------------------------------------------

    def take_alert(self) -> AlertNotice | None:
        return self._alerts.popleft() if self._alerts else None

    def take_spend(self) -> Published | None:
        """The newest state not yet taken, if any (a paced subscription also
        sees released states; the first state is the floor)."""
        newest = self._first
        released = self._fanout.released
        if self.paced and released is not None:
            if newest is None or released.number > newest.number:
                newest = released
        if newest is None or newest.number <= self._taken:
            return None
        self._taken = newest.number
        return newest

    async def wait(self) -> None:
        """Sleep until :meth:`wake` (an alert, a state, a close, or the owner)."""
        await self._lot.park()

    async def next(self) -> Published | AlertNotice:
        while True:
            alert = self.take_alert()
            if alert is not None:
                return alert
            spend = self.take_spend()
            if spend is not None:
                return spend
            if self.closed:
                raise trio.EndOfChannel
            await self.wait()


class Fanout:
    """The actor's publication slot and the task that releases states.

    Lives as long as the service (across actor restarts); the actor of the
    moment publishes into it and registers subscriptions with it.
    """

    def __init__(self, cpu_clock: Callable[[], float] = time.thread_time) -> None:
        # CPU time of the event loop's thread (the fan-out task runs there).
        self._cpu_clock = cpu_clock
        self._subscriptions: set[Subscription] = set()
        # The paced ones among them, woken on every release.
        self._paced: set[Subscription] = set()
        self._newest: Published | None = None
        #: The newest state released to subscribers (encoded).
        self.released: Published | None = None
        self._numbered = 0
        self._published_at = -math.inf
        self._released_at = -math.inf
        self._released_cpu = 0.0
        # Observers' push time charged since the last release.
        self._cost = 0.0
        # The fan-out task, waiting for a state newer than the released one.
        self._idle = trio.lowlevel.ParkingLot()
        # Owners waiting in released_after().
        self._rounds = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._subscriptions)

    # -- the actor's side (synchronous, O(1) per state) ----------------------

    @property
    def listening(self) -> bool:
        """True if anyone subscribes, i.e. states are worth building."""
        return bool(self._subscriptions)

    def publish(self, published: Published) -> None:
        """Make ``published`` the newest state (no-op if it already is)."""
        if published is self._newest:
            return
        self._numbered += 1
        published.number = self._numbered
        self._newest = published
        self._published_at = trio.current_time()
        if self._idle:
            self._idle.unpark_all()

    def subscribe(self, subscription: Subscription, current: Published) -> None:
        """Register ``subscription``; ``current`` (the newest state) is its first."""
        self.publish(current)
        subscription._first = current
        self._subscriptions.add(subscription)
        if subscription.paced:
            self._paced.add(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        self._paced.discard(subscription)
        subscription.close()

    def alert(self, notice: AlertNotice) -> None:
        """Queue ``notice`` for every subscriber; overflowed ones are dropped."""
        gone = []
        for subscription in self._subscriptions:
            subscription.offer_alert(notice)
            if subscription.closed:
                gone.append(subscription)
        self._subscriptions.difference_update(gone)
        self._paced.difference_update(gone)

    def close_all(self) -> None:
        """The actor ends: every subscription ends (owners subscribe again)."""
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        self._paced.clear()

    # -- the owners' side -----------------------------------------------------

    async def released_after(self, number: int) -> Published:
        """Wait for a released state numbered above ``number``; the newest one."""
        while self.released is None or self.released.number <= number:
            await self._rounds.park()
        return self.released

    def charge(self, seconds: float) -> None:
        """Report push work done for the last released state (spaces the next)."""
        self._cost += seconds

    # -- the fan-out task -----------------------------------------------------

    def _may_release(self, now: float) -> bool:
        """Whether the newest state may be released now (see the module doc)."""
        since = now - self._released_at
        cost = self._cost
        if since < MIN_GAP_S or cost > WALL_SHARE * since:
            return False
        if now - self._published_at >= QUIET_S or since >= MAX_GAP_S:
            return True
        others = self._cpu_clock() - self._released_cpu - cost
        return cost <= BUSY_SHARE * others

    async def run(self) -> None:
        """Release the newest state whenever the pacing allows; runs until
        cancelled. Never raises otherwise: it only reads clocks and wakes tasks."""
        while True:
            newest = self._newest
            if newest is None or newest is self.released:
                await self._idle.park()
                continue
            now = trio.current_time()
            if not self._may_release(now):
                await trio.sleep(POLL_S)
                continue
            newest.json()  # encoded once, here, for every subscriber
            self.released = newest
            self._released_at = now
            self._released_cpu = self._cpu_clock()
            self._cost = 0.0
            if self._rounds:
                self._rounds.unpark_all()
            for subscription in self._paced:
                subscription.wake()
