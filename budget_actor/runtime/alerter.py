"""The alerter: delivers each threshold crossing to AG Lu, once.

Delivery is two steps, in this order: the ``sibling_nudge`` row is made durable
(through the persister, the only writer), then the actor pushes the ``alert``
to every subscriber. Row first, so that a crash in between can at worst lose
the live push, never send the nudge twice: on restart the row marks the alert
as sent. A crash *before* the row exists loses nothing either, because restore
recomputes the crossing from the journal and the alert is due again.

The alert being delivered lives in :class:`AlertQueue`, which outlives any one
run of the alerter, so a restarted alerter finishes it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

from ..core.records import Alert
from .messages import AlertDelivered, AlertWithdrawn, Message, Reply
from .persister import NudgeJob, PersistQueue


class AlertQueue:
    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[Alert](math.inf)
        self.current: Alert | None = None

    def put(self, alert: Alert) -> None:
        self.send.send_nowait(alert)

    def pending(self) -> list[Alert]:
        """Every alert not yet delivered (for the final flush at shutdown)."""
        alerts = [] if self.current is None else [self.current]
        while True:
            try:
                alerts.append(self.recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return alerts


class Alerter:
    def __init__(
        self,
        queue: AlertQueue,
        persist: PersistQueue,
        deliver: Callable[[Message], Awaitable[None]],
    ) -> None:
        self.queue = queue
        self.persist = persist
        self.deliver = deliver

    async def run(self) -> None:
        queue = self.queue
        while True:
            if queue.current is None:
                try:
                    queue.current = await queue.recv.receive()
                except trio.EndOfChannel:
                    return
            alert = queue.current
            written: Reply[str] = Reply()
            self.persist.put(NudgeJob(alert, written))
            # Pushed whether or not this write inserted the row: a retried
            # write whose first attempt did commit finds the row there, and
            # the push is still owed; with a shared budget, another instance
            # may have written it, and this instance's subscribers are still
            # owed the push. Restore never re-raises an alert whose row
            # exists, so this cannot push twice.
            if await written.get() == "premature":
                await self.deliver(AlertWithdrawn(alert))
            else:
                await self.deliver(AlertDelivered(alert))
            queue.current = None
