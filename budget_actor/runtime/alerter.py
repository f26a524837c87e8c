"""The alerter: delivers each threshold crossing to AG Lu, once.

Delivery is two steps, in this order: the ``sibling_nudge`` row is made durable
(through the persister, the only writer), then the actor pushes the ``alert``
to every subscriber. Row first, so that a crash in between can at worst lose
the live push, never send the nudge twice: on restart the row marks the alert
as sent. A crash *before* the row exists loses nothing either, because restore
recomputes the crossing from the journal and the alert is due again.

The alerts, and the one being delivered, live in a
:class:`~budget_actor.runtime.resumable.ResumableQueue`, which outlives any one
run of the alerter, so a restarted alerter finishes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..core.records import Alert
from .messages import AlertDelivered, AlertWithdrawn, Message, Reply
from .persister import NudgeJob, PersistQueue
from .resumable import ResumableQueue


class Alerter:
    def __init__(
        self,
        queue: ResumableQueue[Alert],
        persist: PersistQueue,
        deliver: Callable[[Message], Awaitable[None]],
    ) -> None:
        self.queue = queue
        self.persist = persist
        self.deliver = deliver

    async def run(self) -> None:
        queue = self.queue
        while True:
            alert = await queue.next()
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
            queue.done()
