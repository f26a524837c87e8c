"""The in-process API: start a budget service inside your trio program.

::

    async with budget_actor.open_budget(database="sqlite:///budget.db") as budget:
        receipt = await budget.record("dispatch-1", "0.045864", model="gpt-x")
        await budget.cycle()
        print((await budget.health()).daily_spend)

:func:`open_budget` opens the store, restores today, starts the actor and its
children, and on exit stops them with a final persist. A :class:`Budget` is the
handle: every call is a message to the actor, so it is safe to use from any
number of tasks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import trio

from ..core.config import BudgetConfig
from ..core.cost import Cost, InvalidCost, check_dispatch_id, check_estimate, make_cost
from ..core.history import DEFAULT_DAYS, MAX_DAYS, History
from ..core.views import Admission, Health, Receipt, Update
from ..core.webhook import parse_webhook_url, target_of
from ..core.wire import MAX_BATCH_ITEMS
from ..stores.open import open_store
from ..stores.spill import SpillFile, claim
from ..stores.store import Store, StoreError
from .actor import BudgetActor, drain_spill, run_supervised
from .fanout import Fanout, Published, Subscription
from .history import HistoryReader
from .messages import (
    Admit,
    BatchReceipt,
    ChildFailed,
    CostReceipt,
    CostUnavailable,
    CountCycle,
    Message,
    QueryHealth,
    RecordCost,
    RecordCosts,
    Reply,
    ServiceStopped,
    Shutdown,
    Subscribe,
    Unsubscribe,
)
from .stats import ServiceStats, WebhookStats
from .supervisor import RestartPolicy, supervise
from .webhooks import WebhookPolicy, WebhookSender

# Bounded, so that a flood of costs slows its senders (backpressure) instead of
# growing memory without limit. Large enough that the actor drains it in
# batches and senders rarely wait.
MAILBOX_SIZE = 4096
# How many send_cost calls may go by without a checkpoint. At a few
# microseconds each, 64 calls keep other tasks waiting well under a millisecond.
SEND_COST_CHECKPOINT_EVERY = 64


def default_spill_path(store: Store) -> Path:
    """Where acknowledged costs wait during an outage, unless told otherwise:
    the store's own choice (:meth:`Store.spill_path`)."""
    return store.spill_path()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Budget:
    """Handle on a running budget service. Create it with :func:`open_budget`."""

    def __init__(
        self,
        config: BudgetConfig,
        store_kind: str,
        outbox: trio.MemorySendChannel[Message],
        stats: ServiceStats | None = None,
        history: HistoryReader | None = None,
        fanout: Fanout | None = None,
    ) -> None:
        self.config = config
        self.store_kind = store_kind
        #: Released spend states, for servers that push them themselves
        #: (``open_subscription(paced=False)``).
        self.fanout = fanout if fanout is not None else Fanout()
        #: Histograms and counters gathered where they happen (for /metrics).
        self.stats = stats or ServiceStats()
        self._history = history
        self._outbox = outbox
        # send_cost calls since its last checkpoint.
        self._unyielded = 0

    async def record(
        self,
        dispatch_id: str,
        usd: Decimal | str | int,
        *,
        model: str | None = None,
        agent: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> Receipt:
        """Count one dispatch's cost; return once it is durable in the store
        (or, while the store is down, in the spill file).

        A ``dispatch_id`` already counted today is not counted again
        (``duplicate=True``). Raises :class:`InvalidCost` (nothing changed) for
        a bad amount or field, :class:`CostUnavailable` if the cost cannot be
        made durable now (the store and the spill file both fail, e.g. a full
        disk: it was not counted; resend it later), and :class:`ServiceStopped`
        after shutdown. Without a spill file, this waits while the store is
        down. Cancelling the wait does not un-count the cost, and re-sending it
        is safe (same ``dispatch_id``).
        """
        cost = make_cost(
            dispatch_id,
            usd,
            model,
            input_tokens,
            output_tokens,
            agent,
            max_cost=self.config.max_cost,
        )
        receipt = await self.submit(cost)
        await _durable(receipt, f"cost {dispatch_id!r}", "it was not counted")
        return Receipt(dispatch_id, receipt.seq, receipt.duplicate)

    async def record_many(self, costs: Sequence[Mapping[str, object]]) -> list[Receipt]:
        """Count a batch of costs, in order, as one message; return once every
        one is durable, with a :class:`Receipt` per item, in order.

        The in-process twin of the ``costs`` frame: each item is a mapping
        with the fields of :meth:`record` (``dispatch_id`` and ``usd``
        required; ``model``, ``agent``, ``input_tokens``, ``output_tokens``
        optional). One message, one wait and one barrier per batch instead of
        per cost: for a caller with many costs at hand, durable ingest goes
        1.7 to 3.5 times as fast in the benchmark (``docs/performance.md``).

        All or nothing: every item is checked first, and an empty batch, one
        of more than :data:`~budget_actor.core.wire.MAX_BATCH_ITEMS` items, an
        unknown field or a bad value raises :class:`InvalidCost` (code
        ``invalid_cost``, its message naming the item: ``costs[3]: ...``)
        with nothing counted. A ``dispatch_id`` counted before, or earlier in
        the same batch, is a duplicate, as with :meth:`record`.
        :class:`CostUnavailable`: the batch could not all be made durable
        (store and spill file failing); what was not durable was not counted,
        and resending the whole batch is safe (what did count comes back as
        duplicates). :class:`ServiceStopped` after shutdown, or if the
        service ended before the batch was durable: resend it. Cancelling
        the wait does not un-count the batch.
        """
        checked = _checked_batch(costs, self.config.max_cost)
        receipt = await self.submit_many(checked)
        await _durable(
            receipt,
            f"the batch of {len(checked)} costs from {checked[0].dispatch_id!r}",
            "what was not durable was not counted",
        )
        return [
            Receipt(cost.dispatch_id, seq, duplicate)
            for cost, seq, duplicate in zip(checked, receipt.seqs, receipt.duplicates, strict=True)
        ]

    async def send_cost(
        self,
        dispatch_id: str,
        usd: Decimal | str | int,
        *,
        model: str | None = None,
        agent: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Fire and forget: hand the cost to the actor and return at once.

        The cost is validated here (:class:`InvalidCost`) and counted in
        order with everything else, but this returns before it is durable: if
        the process dies in the next few milliseconds, the cost is lost and
        nobody is told. Use :meth:`record` when that matters.

        Scheduling: while the mailbox has room this does not yield to other
        tasks, except once every :data:`SEND_COST_CHECKPOINT_EVERY` calls (a
        trio checkpoint: other tasks run, and cancellation is delivered). That
        lets the actor take costs in batches instead of waking for each one.
        When the mailbox is full it waits (backpressure).
        """
        cost = make_cost(
            dispatch_id,
            usd,
            model,
            input_tokens,
            output_tokens,
            agent,
            max_cost=self.config.max_cost,
        )
        message = RecordCost(cost)
        self._unyielded += 1
        if self._unyielded >= SEND_COST_CHECKPOINT_EVERY:
            self._unyielded = 0
        await self._send(message, checkpoint=self._unyielded == 0)

    async def submit(self, cost: Cost) -> CostReceipt:
        """Hand an already validated cost (from :func:`budget_actor.core.wire.decode`)
        to the actor and return its receipt at once, without waiting for
        durability: ``receipt.durable`` is set once it is in the store (or
        ``receipt.failed`` if the service ended first). For servers that
        pipeline; others use :meth:`record`.
        """
        receipt = CostReceipt()
        # No checkpoint while the mailbox has room: the caller is about to
        # wait for the receipt, which is one; a second would only cost a
        # scheduler round-trip per cost.
        await self._send(RecordCost(cost, receipt), checkpoint=False)
        return receipt

    async def submit_many(self, costs: list[Cost]) -> BatchReceipt:
        """:meth:`submit` for a batch (a ``costs`` frame): one message to the
        actor, which counts the costs in order. ``receipt.seqs`` and
        ``receipt.duplicates`` give each item's answer; ``receipt.durable`` is
        set once every item is durable (or ``receipt.failed`` if the service
        ended first: then none of it may be acknowledged)."""
        receipt = BatchReceipt()
        await self._send(RecordCosts(costs, receipt), checkpoint=False)
        return receipt

    async def admit(self, dispatch_id: str, estimate_usd: Decimal | str | int) -> Admission:
        """Ask before a dispatch whether ``estimate_usd`` still fits under the
        cap, and if so reserve it until the cost with the same ``dispatch_id``
        settles it, or the reservation expires (``reservation_ttl_s``).

        Raises :class:`InvalidCost` for a bad estimate or id (nothing changes),
        and :class:`ServiceStopped` if the service stops first. On SQLite the
        reservations live in this service's memory (a restart forgets them);
        on PostgreSQL the database decides against the global cap of every
        instance sharing the budget, and refuses while it cannot be reached.
        """
        estimate = check_estimate(estimate_usd, self.config.max_cost)
        reply: Reply[Admission] = Reply()
        await self._send(Admit(check_dispatch_id(dispatch_id), estimate, reply))
        return await reply.get()

    async def cycle(self) -> None:
        """Count one heartbeat cycle (every ``persist_every``-th writes the patch)."""
        await self._send(CountCycle())

    async def health(self) -> Health:
        """Every health figure, as the actor sees it now."""
        reply: Reply[Health] = Reply()
        await self._send(QueryHealth(reply))
        health = await reply.get()
        webhooks = self.stats.webhooks
        if webhooks is not None:
            # The webhook child keeps this figure; the actor never sees it.
            health = msgspec.structs.replace(health, webhooks_pending=webhooks.pending)
        return health

    async def history(self, days: int = DEFAULT_DAYS) -> History:
        """The last ``days`` days (1 to 366), oldest first and today last,
        with today's cumulative spend once a minute from the journal.

        Raises ``ValueError`` for a bad ``days``, ``StoreError`` when the
        store cannot be read, :class:`ServiceStopped` after shutdown. Reads
        on a connection of its own: the persister never waits for it.
        """
        if not 1 <= days <= MAX_DAYS:
            raise ValueError(f"`days` must be an integer from 1 to {MAX_DAYS}")
        if self._history is None:
            raise ServiceStopped("this budget handle has no history reader")
        return await self._history.read(days, await self.health())

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[Update]]:
        """Live updates: the current :class:`Spend` at once, then every change
        (latest-value: intermediate states may be skipped) and every
        :class:`AlertNotice` (never skipped). The iterator ends when the
        service stops.
        """
        subscription = await self.open_subscription()
        try:
            yield _updates(subscription)
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                self._outbox.send_nowait(Unsubscribe(subscription))
            subscription.close()

    async def open_subscription(self, *, paced: bool = True) -> Subscription:
        """Lower-level :meth:`subscribe` for servers: items are
        :class:`Published` (with a cached JSON encoding) or alerts. The caller
        must send :meth:`unsubscribe` when done.

        With ``paced=False`` the subscription yields only its first state and
        its alerts; the caller takes later states from :attr:`fanout`
        (:meth:`Fanout.released_after`) and reports its push work there
        (:meth:`Fanout.charge`). Raises :class:`ServiceStopped` if the
        service has stopped."""
        subscription = Subscription(self.fanout, paced=paced)
        await self._send(Subscribe(subscription))
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock
        ):
            self._outbox.send_nowait(Unsubscribe(subscription))

    async def stop(self) -> None:
        """Ask the actor to stop after everything already sent (idempotent)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._outbox.send(Shutdown())

    async def _send(self, message: Message, *, checkpoint: bool = True) -> None:
        try:
            if not checkpoint:
                try:
                    self._outbox.send_nowait(message)
                    return
                except trio.WouldBlock:
                    pass  # full: wait for room (backpressure)
            await self._outbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ServiceStopped("the budget service has stopped") from None


async def _durable(receipt: CostReceipt, what: str, counted: str) -> None:
    """Wait until ``receipt`` is durable; :class:`CostUnavailable` or
    :class:`ServiceStopped` (naming ``what``) if it never will be."""
    await receipt.durable.wait()
    if receipt.unavailable:
        raise CostUnavailable(
            f"{what} could not be made durable now (the store and the spill file are"
            f" failing); {counted}: resend it later with the same dispatch_id"
        )
    if receipt.failed:
        raise ServiceStopped(
            f"the budget service stopped before {what} was durable;"
            " resend it with the same dispatch_id"
        )


# The fields a record_many item may carry: those of record().
_COST_FIELDS = frozenset(("dispatch_id", "usd", "model", "input_tokens", "output_tokens", "agent"))
_MISSING = object()


def _checked_batch(costs: Sequence[Mapping[str, object]], max_cost: Decimal) -> list[Cost]:
    """The validated costs of a :meth:`Budget.record_many` batch, or
    :class:`InvalidCost` naming the first bad item (pure: nothing changes).
    Every refusal has the code ``invalid_cost``, as a refused ``costs``
    frame does."""
    if isinstance(costs, (str, bytes, Mapping)) or not isinstance(costs, Sequence):
        raise InvalidCost("costs must be a sequence of mappings", "invalid_cost")
    if not 1 <= len(costs) <= MAX_BATCH_ITEMS:
        raise InvalidCost(
            f"costs must hold 1 to {MAX_BATCH_ITEMS:,} items, not {len(costs):,}",
            "invalid_cost",
        )
    checked = []
    for index, item in enumerate(costs):
        if not isinstance(item, Mapping):
            raise InvalidCost(
                f"costs[{index}] must be a mapping of a cost's fields", "invalid_cost"
            )
        if not item.keys() <= _COST_FIELDS:
            unknown = min(repr(k) for k in item if k not in _COST_FIELDS)
            raise InvalidCost(f"costs[{index}]: unknown field {unknown}", "invalid_cost")
        get = item.get
        dispatch_id, usd = get("dispatch_id", _MISSING), get("usd", _MISSING)
        if dispatch_id is _MISSING or usd is _MISSING:
            missing = "dispatch_id" if dispatch_id is _MISSING else "usd"
            raise InvalidCost(f"costs[{index}].{missing} is missing", "invalid_cost")
        try:
            cost = make_cost(
                dispatch_id,
                usd,
                get("model"),
                get("input_tokens"),
                get("output_tokens"),
                get("agent"),
                max_cost=max_cost,
            )
        except InvalidCost as exc:
            raise InvalidCost(f"costs[{index}]: {exc.detail}", exc.code) from None
        checked.append(cost)
    return checked


async def _updates(subscription: Subscription) -> AsyncIterator[Update]:
    while True:
        try:
            item = await subscription.next()
        except trio.EndOfChannel:
            return
        yield item.spend if isinstance(item, Published) else item


@contextlib.asynccontextmanager
async def open_budget(
    config: BudgetConfig | None = None,
    *,
    database: str | Store = "sqlite:///budget.db",
    clock: Callable[[], datetime] = _utc_now,
    policy: RestartPolicy | None = None,
    spill: str | os.PathLike[str] | bool | SpillFile = True,
    instance: str | None = None,
    webhooks: Sequence[str] = (),
    webhook_policy: WebhookPolicy | None = None,
) -> AsyncIterator[Budget]:
    """Open the store, restore today and run the budget actor for the block.

    ``database`` is a URL (``sqlite:///PATH`` or ``postgresql://…``) or a
    :class:`Store`. ``clock`` returns the current time as an aware datetime
    (inject one to test day rollover). ``spill`` is the spill file that holds
    acknowledged costs while the store is unreachable: ``True`` for the default
    (:func:`default_spill_path`, or the first free slot beside it when other
    live instances hold it), a path (or a :class:`SpillFile`), or ``False`` for
    none (then, during an outage, :meth:`Budget.record` waits for the store). ``instance`` is this
    service's id among the instances sharing a PostgreSQL budget (default:
    host name and process id); see ``docs/scaling.md``. ``webhooks`` are the
    URLs to which every alert is POSTed (at least once, across restarts; see
    :mod:`budget_actor.runtime.webhooks`).

    Raises ``ValueError`` for a webhook that is not an http(s) URL, and
    :class:`~budget_actor.StoreError` if the store cannot be opened or read,
    or if the spill file is not safe to use (a symbolic link, another user's,
    not mode 0600: :class:`~budget_actor.stores.spill.UnsafeFile`). If a
    child task fails too often, the block is cancelled and an
    ``ExceptionGroup`` holding :class:`~budget_actor.Escalation` propagates.
    On exit (normal, exception or cancellation) the actor handles what was
    already sent, then writes everything with a final patch (bounded time).
    """
    config = config or BudgetConfig()
    hooks = [parse_webhook_url(url) for url in dict.fromkeys(webhooks)]
    store = open_store(database, instance) if isinstance(database, str) else database
    store.webhook_targets = tuple(target_of(hook.url) for hook in hooks)
    async with _opened(store, config, spill, clock) as (spill_file, limiter):
        outbox, inbox = trio.open_memory_channel[Message](MAILBOX_SIZE)
        restart_policy = policy or RestartPolicy()
        stats = ServiceStats()
        if hooks:
            stats.webhooks = WebhookStats()
        fanout = Fanout()

        def make_actor() -> BudgetActor:
            return BudgetActor(
                config,
                store,
                inbox,
                outbox,
                clock=clock,
                limiter=limiter,
                policy=restart_policy,
                spill=spill_file,
                stats=stats,
                fanout=fanout,
            )

        def restarted(child: str) -> None:
            # Counted by the actor, like its own children's restarts.
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                outbox.send_nowait(ChildFailed(child))

        # The webhook child runs beside the actor, not under it: it needs
        # nothing of the actor's state, and an actor restart must not cut a
        # delivery short. It stops when the service stops.
        webhooks_scope = trio.CancelScope()
        companion = store.companion() if stats.webhooks is not None else None
        # Its connection opens at the first GET /history.
        history = HistoryReader(store.companion(), config)

        async def deliver_webhooks(sender: WebhookSender) -> None:
            with webhooks_scope:
                await supervise("webhooks", sender.run, restart_policy, restarted)

        # The fan-out task only paces and wakes (nothing in it can fail); it
        # ends with the last actor, which closes every subscription.
        releasing = trio.CancelScope()

        async def release_states() -> None:
            with releasing:
                await fanout.run()

        async def run_actors(task_status: trio.TaskStatus[None]) -> None:
            try:
                await run_supervised(make_actor, inbox, restart_policy, task_status=task_status)
            finally:
                releasing.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(release_states)
                await nursery.start(run_actors)
                budget = Budget(config, store.kind, outbox, stats, history, fanout)
                if companion is not None and stats.webhooks is not None:
                    sender = WebhookSender(
                        companion,
                        hooks,
                        owner=store.instance or store.kind,
                        clock=clock,
                        stats=stats.webhooks,
                        policy=webhook_policy,
                        store_timeout_s=config.store_timeout_s,
                    )
                    nursery.start_soon(deliver_webhooks, sender)
                try:
                    yield budget
                finally:
                    webhooks_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await budget.stop()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(history.close)
                if companion is not None:
                    await trio.to_thread.run_sync(companion.close)


@contextlib.asynccontextmanager
async def _opened(
    store: Store,
    config: BudgetConfig,
    spill: str | os.PathLike[str] | bool | SpillFile,
    clock: Callable[[], datetime],
) -> AsyncIterator[tuple[SpillFile | None, trio.CapacityLimiter]]:
    """Claim the spill file, open ``store`` and drain the spill files of
    instances that died; yield the spill file and the store's limiter, and
    close both at the end (shielded). Raises what :func:`open_budget`
    documents; on an error nothing stays claimed."""
    spill_file, orphans = _claim_spill(store, config, spill)
    limiter = trio.CapacityLimiter(1)
    try:
        await trio.to_thread.run_sync(store.open, limiter=limiter)
        # Spill files of instances that died and did not come back: their
        # acknowledged costs go to the store before anything is restored.
        for orphan in orphans:
            await trio.to_thread.run_sync(
                drain_spill, orphan, store, config, clock(), limiter=limiter
            )
            orphan.release()
    except BaseException:
        for held in [*orphans, spill_file]:
            if held is not None:
                held.release()
        raise
    try:
        yield spill_file, limiter
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close, limiter=limiter)
        if spill_file is not None:
            spill_file.release()


def _claim_spill(
    store: Store, config: BudgetConfig, spill: str | os.PathLike[str] | bool | SpillFile
) -> tuple[SpillFile | None, list[SpillFile]]:
    """This service's spill file (see :func:`open_budget`'s ``spill``), and
    the unclaimed ones of dead instances beside the default one."""
    if spill is True:
        return claim(default_spill_path(store), max_cost=config.max_cost)
    if spill is False:
        return None, []
    spill_file = (
        spill if isinstance(spill, SpillFile) else SpillFile(spill, max_cost=config.max_cost)
    )
    if not spill_file.lock():
        raise StoreError(f"spill file {spill_file.path} is in use by another budget-actor")
    return spill_file, []
