"""Subscriptions: bounded, latest-value queues between the actor and a subscriber.

The actor must never wait for a subscriber. So a subscription is not a channel
but two slots: the *latest* ``spend`` state (a newer one replaces an older one
that was not yet taken) and a short FIFO of ``alert`` notices, which are never
dropped. Offering is synchronous and O(1); the subscriber's own task wakes up,
takes what is there and does its slow sending on its own time.

A :class:`Published` spend state caches its JSON encoding, so a change is
encoded once however many WebSocket subscribers send it.
"""

from __future__ import annotations

from collections import deque

import trio

from ..core.views import AlertNotice, Spend
from ..core.wire import encode

# Alerts are a handful per day (one per threshold); a subscriber that has let
# this many pile up is not reading at all. Past it the subscription is marked
# overflowed and its owner closes it, rather than silently dropping an alert.
MAX_PENDING_ALERTS = 256


class Published:
    """One spend state, shared by all subscribers, encoded at most once."""

    __slots__ = ("_frame", "spend")

    def __init__(self, spend: Spend) -> None:
        self.spend = spend
        self._frame: str | None = None

    def frame(self) -> str:
        """The ``spend`` message as JSON text (WebSocket text frames are str)."""
        if self._frame is None:
            self._frame = encode(self.spend).decode()
        return self._frame


class Subscription:
    """What one subscriber has not yet taken.

    :meth:`next` waits for the next item: pending alerts come first, in order,
    then the latest spend state. Raises ``trio.EndOfChannel`` once the
    subscription is closed and drained; ``overflowed`` tells why it closed, if
    it was because the subscriber stopped reading alerts.
    """

    def __init__(self) -> None:
        self._latest: Published | None = None
        self._alerts: deque[AlertNotice] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.overflowed = False

    # -- the actor's side (synchronous, never blocks) -------------------------

    def offer_spend(self, published: Published) -> None:
        self._latest = published
        self._lot.unpark_all()

    def offer_alert(self, alert: AlertNotice) -> None:
        if len(self._alerts) >= MAX_PENDING_ALERTS:
            self.overflowed = True
            self.close()
            return
        self._alerts.append(alert)
        self._lot.unpark_all()

    def close(self) -> None:
        self.closed = True
        self._lot.unpark_all()

    # -- the subscriber's side -----------------------------------------------

    async def next(self) -> Published | AlertNotice:
        while True:
            if self._alerts:
                return self._alerts.popleft()
            if self._latest is not None:
                latest, self._latest = self._latest, None
                return latest
            if self.closed:
                raise trio.EndOfChannel
            await self._lot.park()
