"""The budget actor: the one task that owns the day's spend.

Its mailbox is a bounded trio memory channel of :mod:`budget_actor.runtime.messages`.
It drains the mailbox in batches, feeds each message to the pure
:class:`~budget_actor.core.ledger.Ledger`, hands the resulting work to its children
without ever waiting for them, and after each batch puts the new spend state
in the fan-out's slot (one write, whatever the number of subscribers; see
:mod:`budget_actor.runtime.fanout`). Nothing else touches the ledger, so
there are no locks.

Children, each supervised (restart with backoff, escalate when failing too
often):

* **persister**: writes journal entries, patches and nudge rows;
* **alerter**: delivers threshold crossings to AG Lu;
* **ticker**: sends a :class:`Tick` every second so the day rolls over at
  midnight even when no cost arrives;
* **coordinator** (PostgreSQL, where instances share the budget): reads the
  other instances' totals and decides admissions against the global cap
  (:mod:`budget_actor.runtime.coordinator`).

Shutdown: a :class:`Shutdown` message ends the loop after everything before it
was handled; cancellation ends it at once. Either way the children stop, then a
final flush (shielded, bounded by ``SHUTDOWN_GRACE_S``) writes every queued
journal entry, pending nudge and the final patch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import trio

from ..core.config import BudgetConfig
from ..core.ledger import AlertDue, Effect, Ledger, PatchDue, day_of
from ..core.records import Alert, JournalEntry
from ..core.views import Admission, AlertNotice
from ..stores.spill import SpillFile
from ..stores.store import Store
from .alerter import Alerter
from .coordinator import Coordinator
from .fanout import Fanout, Published
from .messages import (
    Admit,
    AlertDelivered,
    AlertWithdrawn,
    ChildFailed,
    CountCycle,
    Message,
    QueryHealth,
    RecordCost,
    RecordCosts,
    Shutdown,
    StoreReport,
    Subscribe,
    Synced,
    Tick,
    Uncount,
    Unsubscribe,
    fail_waiters,
)
from .persister import (
    BarrierJob,
    CheckJob,
    JournalJob,
    NudgeJob,
    PatchJob,
    Persister,
    PersistQueue,
)
from .resumable import ResumableQueue
from .stats import ServiceStats
from .supervisor import Escalation, RestartPolicy, Restarts, supervise

log = logging.getLogger("budget_actor.actor")

# Messages handled per wake-up before publishing: batching amortises the
# publish and the scheduler round-trip; the cap bounds how stale a push can be
# under a flood.
MAX_BATCH = 512
# How often time is checked for a day rollover when no message arrives.
TICK_S = 1.0
# Time allowed for the final flush at shutdown. An orchestrator sends SIGKILL
# some seconds after SIGTERM (Kubernetes: 30 s); stay well inside that.
SHUTDOWN_GRACE_S = 10.0


class BudgetActor:
    def __init__(
        self,
        config: BudgetConfig,
        store: Store,
        inbox: trio.MemoryReceiveChannel[Message],
        outbox: trio.MemorySendChannel[Message],
        *,
        clock: Callable[[], datetime],
        limiter: trio.CapacityLimiter,
        policy: RestartPolicy,
        spill: SpillFile | None = None,
        stats: ServiceStats | None = None,
        fanout: Fanout | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._inbox = inbox
        self._outbox = outbox
        self._clock = clock
        self._limiter = limiter
        self._policy = policy
        self._spill = spill
        self._stats = stats or ServiceStats()
        # trio time of the current wake-up (see _loop): the costs counted in
        # it share this stamp, for the ack latency histogram.
        self._woke_at = 0.0
        self._persist = PersistQueue(spill)
        self._alerts: ResumableQueue[Alert] = ResumableQueue()
        self._admits: ResumableQueue[Admit] = ResumableQueue()
        # trio time of the last read of the other instances' totals.
        self._synced_at: float | None = None
        # Outlives this actor (a restarted one publishes into the same one).
        self._fanout = fanout if fanout is not None else Fanout()
        self._published: Published | None = None
        self._published_version = -1
        self._started_at = 0.0
        #: True once restored and handling messages.
        self.ready = False
        self._stopping = False
        # The mailbox's messages and their handlers: each small, synchronous,
        # never awaiting (the actor must not wait for anyone).
        self._handlers: dict[type[Message], Callable[[Any], None]] = {
            RecordCost: self._on_cost,
            RecordCosts: self._on_costs,
            Admit: self._on_admit,
            CountCycle: self._on_cycle,
            Tick: self._on_tick,
            QueryHealth: self._on_health,
            StoreReport: self._on_store_report,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
            AlertDelivered: self._on_alert_delivered,
            AlertWithdrawn: self._on_alert_withdrawn,
            Synced: self._on_synced,
            Uncount: self._on_uncount,
            ChildFailed: self._on_child_failed,
            Shutdown: self._on_shutdown,
        }

    # Set by run() once restored; every handler runs after that.
    _ledger: Ledger

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore, start the children, then handle messages until shutdown.

        Raises :class:`~budget_actor.stores.store.StoreError` if the restore fails,
        and an ``ExceptionGroup`` holding an
        :class:`~budget_actor.runtime.supervisor.Escalation` if a child fails too often.
        """
        now = self._clock()
        if self._spill is not None:
            await trio.to_thread.run_sync(
                drain_spill, self._spill, self.store, self.config, now, limiter=self._limiter
            )
        day = day_of(now, self.config)
        latest = await trio.to_thread.run_sync(self.store.latest_day, limiter=self._limiter)
        if latest is not None and latest > day:
            # The clock was set back across midnight: a day already counted in
            # must not be reopened (the costs resent now would count again in
            # the earlier one). Stay on it until the clock gets past it.
            log.warning(
                "the clock says %s but the journal already has costs of %s; counting on %s",
                day,
                latest,
                latest,
            )
            day = latest
        restored = await trio.to_thread.run_sync(self.store.load, day, limiter=self._limiter)
        restoring = Ledger.restore(self.config, self._clock(), restored)
        self._ledger = ledger = restoring.value
        self._started_at = trio.current_time()
        self.ready = True
        persister = Persister(
            self.store,
            self._persist,
            self._limiter,
            self._clock,
            self._outbox.send,
            self._stats,
            refuse=self._refused,
            timeout_s=self.config.store_timeout_s,
        )
        alerter = Alerter(self._alerts, self._persist, self._outbox.send)
        children = [
            ("persister", persister.run),
            ("alerter", alerter.run),
            ("ticker", self._tick),
        ]
        shared = self.store.shared_budget()
        if shared is not None:
            coordinator = Coordinator(
                shared,
                self.config,
                self._admits,
                lambda: ledger.day,
                self._outbox.send,
            )
            children.append(("coordinator", coordinator.run))
        try:
            async with trio.open_nursery() as nursery:
                for name, child in children:
                    nursery.start_soon(supervise, name, child, self._policy, self._restarted)
                self._apply(restoring.effects)
                task_status.started()
                await self._loop(ledger)
                nursery.cancel_scope.cancel()
        finally:
            self._fanout.close_all()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(SHUTDOWN_GRACE_S) as grace:
                    await persister.final_flush(
                        ledger.snapshot(),
                        [NudgeJob(alert, None) for alert in self._alerts.pending()],
                        deadline=trio.current_time() + SHUTDOWN_GRACE_S,
                    )
                if grace.cancelled_caught:
                    log.error(
                        "final flush did not finish within %.0fs; %d jobs not written",
                        SHUTDOWN_GRACE_S,
                        self._persist.waiting,
                    )
            # Whatever could not be written was never acknowledged, and an
            # admission not decided was never granted; their senders must
            # hear so rather than wait forever.
            for job in self._persist.unfinished():
                fail_waiters(job)
            for admit in self._admits.pending():
                fail_waiters(admit)

    async def _loop(self, ledger: Ledger) -> None:
        inbox = self._inbox
        while True:
            message = await inbox.receive()
            self._woke_at = trio.current_time()
            before = ledger.version
            handled = 0
            while True:
                self._handle(message)
                if self._stopping:
                    self._publish_if_changed(ledger, before)
                    return
                handled += 1
                if handled == MAX_BATCH:
                    break
                try:
                    message = inbox.receive_nowait()
                except trio.WouldBlock:
                    break
            self._publish_if_changed(ledger, before)

    def _handle(self, message: Message) -> None:
        """Handle one message. If handling fails, whoever waits on the message
        is told (ServiceStopped) before the error propagates and the actor is
        restarted."""
        try:
            self._handlers[type(message)](message)
        except BaseException:
            fail_waiters(message)
            raise

    # -- the handlers, one per message type ------------------------------------

    def _on_cost(self, message: RecordCost) -> None:
        outcome = self._ledger.record(self._clock(), message.cost)
        recorded, receipt = outcome.value, message.receipt
        if receipt is not None:
            receipt.seq = recorded.seq
            receipt.duplicate = recorded.duplicate
        if recorded.entry is not None:
            self._persist.put(JournalJob(recorded.entry, receipt, self._woke_at))
        elif receipt is not None:
            # A duplicate is acknowledged only once the original is durable.
            self._persist.put(BarrierJob(receipt))
        self._apply(outcome.effects)

    def _on_costs(self, message: RecordCosts) -> None:
        # One message for the whole batch: one mailbox hop, and one barrier
        # job whose durability acknowledges every item at once.
        receipt = message.receipt
        ledger, persist, now = self._ledger, self._persist, self._clock()
        for index, cost in enumerate(message.costs):
            outcome = ledger.record(now, cost)
            recorded = outcome.value
            receipt.seqs.append(recorded.seq)
            receipt.duplicates.append(recorded.duplicate)
            if recorded.entry is not None:
                persist.put(JournalJob(recorded.entry, None, self._woke_at, receipt, index))
            if outcome.effects:
                self._apply(outcome.effects)
        # Durable once everything before it is: the batch's own entries, and
        # the originals of its duplicates.
        persist.put(BarrierJob(receipt))

    def _on_admit(self, message: Admit) -> None:
        ledger = self._ledger
        counted = message.counted
        if counted is not None:
            ledger.learn(message.dispatch_id, *counted)
        if ledger.knows(message.dispatch_id) or (ledger.instance is None and message.checked):
            outcome = ledger.admit(
                self._clock(),
                message.dispatch_id,
                message.estimate,
                counted_on=None if counted is None else counted[1],
            )
            message.reply.set(outcome.value)
            self._apply(outcome.effects)
        elif ledger.instance is None:
            # Maybe counted before a restart, or long enough ago to have left
            # the ledger's cache: the store knows. The persister asks it once
            # what is queued before is written, and sends the message back.
            self._persist.put(CheckJob(message, ledger.day))
        elif ledger.store_behind:
            # Costs acknowledged from the spill file are in no share yet:
            # the store would admit against a spend that lacks them.
            message.reply.set(
                Admission(
                    dispatch_id=message.dispatch_id,
                    allowed=False,
                    remaining=ledger.spend().remaining,
                    reason="this instance's costs are not all in the shared store yet"
                    " (database failing or catching up); try again or another instance",
                )
            )
        else:
            # Shared: only the store sees every instance's reservations.
            self._admits.put(message)

    def _on_cycle(self, message: CountCycle) -> None:
        self._apply(self._ledger.cycle(self._clock()).effects)

    def _on_tick(self, message: Tick) -> None:
        self._apply(self._ledger.tick(self._clock()).effects)

    def _on_health(self, message: QueryHealth) -> None:
        self._on_tick(Tick())  # a day that ended shows as the new day
        message.reply.set(
            self._ledger.health(
                self._clock(),
                store=self.store.kind,
                subscribers=len(self._fanout),
                uptime_s=round(trio.current_time() - self._started_at, 3),
                sync_age_s=self._sync_age(),
                spill_quarantined=self._spill.quarantine.count if self._spill else 0,
            )
        )

    def _on_store_report(self, message: StoreReport) -> None:
        if message.ok:
            self._ledger.persisted(
                message.seq,
                message.at,
                patch_written=message.patch_written,
                latency_s=message.latency_s,
            )
        else:
            self._ledger.store_failed()

    def _on_subscribe(self, message: Subscribe) -> None:
        self._fanout.subscribe(message.subscription, self._current(self._ledger))

    def _on_unsubscribe(self, message: Unsubscribe) -> None:
        self._fanout.unsubscribe(message.subscription)

    def _on_alert_delivered(self, message: AlertDelivered) -> None:
        alert = message.alert
        notice = AlertNotice(
            to=alert.to,
            day=alert.day,
            threshold=float(alert.threshold),
            daily_spend=alert.daily_spend,
            daily_cap=alert.daily_cap,
            kind=alert.kind if alert.projected_spend is not None else None,
            projected_spend=alert.projected_spend,
        )
        log.info(
            "alert delivered to %s: %s%% of %s on %s",
            alert.to,
            alert.percent,
            alert.daily_cap,
            alert.day,
        )
        self._fanout.alert(notice)

    def _on_alert_withdrawn(self, message: AlertWithdrawn) -> None:
        self._apply(self._ledger.withdraw(self._clock(), message.alert).effects)

    def _on_synced(self, message: Synced) -> None:
        self._synced_at = message.at
        self._apply(self._ledger.synced(self._clock(), message.others).effects)

    def _on_uncount(self, message: Uncount) -> None:
        for entry, original, day in message.duplicates:
            self._apply(self._ledger.uncount(entry, original, day).effects)

    def _on_child_failed(self, message: ChildFailed) -> None:
        self._ledger.restarted(message.child)

    def _on_shutdown(self, message: Shutdown) -> None:
        self._stopping = True

    def _refused(self, entries: list[JournalEntry]) -> None:
        """The persister's hook: ``entries`` could not be made durable, and
        their senders were told ``unavailable``. Take them back out of the
        ledger, and queue today's patch: the write that finds out when the
        store takes writes again (health stays ``degraded`` until then).

        Called synchronously from the persister's task, not through the
        mailbox: between the refusal and the uncount, no message may answer
        a resend as a duplicate of a cost that is in no journal. That is safe
        without a lock because trio runs one task at a time and the actor
        never awaits in the middle of changing the ledger.
        """
        if not self.ready:
            return
        ledger = self._ledger
        before = ledger.version
        ledger.refuse(self._clock(), entries)
        self._persist.put(PatchJob(ledger.snapshot()))
        self._publish_if_changed(ledger, before)

    def _restarted(self, child: str) -> None:
        # Counted by the actor, which owns the figures; never blocks.
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            self._outbox.send_nowait(ChildFailed(child))

    def _apply(self, effects: tuple[Effect, ...]) -> None:
        """Carry out the ledger's effects: hand-offs that never block."""
        for effect in effects:
            if isinstance(effect, PatchDue):
                self._persist.put(PatchJob(effect.snapshot))
            elif isinstance(effect, AlertDue):
                alert = effect.alert
                what = (
                    f"projected {alert.projected_spend} by midnight"
                    if alert.kind == "forecast"
                    else f"threshold {alert.threshold} crossed"
                )
                log.info("%s on %s: %s of %s", what, alert.day, alert.daily_spend, alert.daily_cap)
                self._alerts.put(effect.alert)

    def _sync_age(self) -> float | None:
        if self._synced_at is None:
            return None
        return round(trio.current_time() - self._synced_at, 3)

    def _current(self, ledger: Ledger) -> Published:
        published = self._published
        if published is None or self._published_version != ledger.version:
            published = self._published = Published(ledger.spend())
            self._published_version = ledger.version
        return published

    def _publish_if_changed(self, ledger: Ledger, before: int) -> None:
        # One slot write: the fan-out task, not the actor, serves subscribers.
        if ledger.version != before and self._fanout.listening:
            self._fanout.publish(self._current(ledger))

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK_S)
            await self._outbox.send(Tick())


async def run_supervised(
    make_actor: Callable[[], BudgetActor],
    inbox: trio.MemoryReceiveChannel[Message],
    policy: RestartPolicy,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the budget actor, and if it fails, a new one restored from the store.

    The mailbox outlives every incarnation, so senders notice nothing but a
    pause. A failed actor's ``finally`` has already written everything it
    had counted (the final flush), so its successor restores all of it.
    Subscriptions of the failed actor end; their owners subscribe again.

    Raises what the first restore raises (the service cannot start), an
    ``ExceptionGroup`` with :class:`Escalation` if a child escalated, and
    :class:`Escalation` if the actor itself keeps failing. Closes the mailbox
    when it ends, so late senders get ``ServiceStopped``.
    """
    restarts = Restarts("budget actor", policy)
    status = task_status
    try:
        while True:
            actor = make_actor()
            try:
                await actor.run(task_status=status)
                return
            except Exception as exc:
                if not actor.ready and status is task_status:
                    raise  # never started: let the caller see why
                if isinstance(exc, BaseExceptionGroup) and exc.subgroup(Escalation):
                    raise
                backoff = restarts.failed(exc)
            if actor.ready:
                status = trio.TASK_STATUS_IGNORED
            await trio.sleep(backoff)
    finally:
        # Messages still in the mailbox were never handled: fail their
        # waiters (ServiceStopped), then refuse new ones.
        while True:
            try:
                fail_waiters(inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        inbox.close()


def drain_spill(spill: SpillFile, store: Store, config: BudgetConfig, now: datetime) -> None:
    """Startup: move what an earlier run spilled into the store, before restore.

    Restore rebuilds today only, so the patch of any earlier day that has
    spilled costs (an outage across midnight) is recomputed from its journal
    here; otherwise it would stay short of them for good.
    """
    spill.open()
    entries = spill.read()
    if entries:
        store.write(entries, [], [], now)
        log.info("recovered %d spilled costs from %s", len(entries), spill.path)
        today = day_of(now, config)
        for day in sorted({entry.day for entry in entries} - {today}):
            store.rebuild_patch(day, config.daily_cap, now)
            log.info("rebuilt the budget patch of %s from its journal", day)
    spill.clear()
