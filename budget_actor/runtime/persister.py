"""The persister: the only task that writes to the store.

It takes jobs from its queue (journal entries of accepted costs, budget
patches, nudge rows, barriers) and group-commits whatever is waiting in one
transaction, in a worker thread. Then it completes the jobs: a cost's receipt
becomes ``durable`` (so its ``ack`` may go out), a nudge's reply says whether
the row was new. It reports each outcome to the actor, which shows health
``degraded`` while the store is unreachable or behind.

**Outages.** When a write fails, the journal entries of the batch go to the
spill file (fsync'd, group-committed, see :mod:`budget_actor.stores.spill`) and are
acknowledged from there; patches and nudges wait in memory (they can be
recomputed from the journal). While the spill file holds entries, new entries
go there too, so their order is kept, and the store is retried with backoff.
Once a retry succeeds, spill file, waiting patches and nudges go to the store in
one transaction, the spill file is emptied, and normal operation resumes.
Without a spill file, the batch is simply retried until the store takes it, and
acks wait.

**Write failures.** A store call that does not answer within the configured
``store_timeout_s`` counts as failed (its worker thread is abandoned and the
store interrupted), so a database that accepts connections but never answers
cannot hold acks. When the spill file cannot be written either (a full disk,
an I/O error), the costs of the batch cannot be made durable: they are
*refused*. Their waiters are answered ``unavailable`` (never acknowledged),
and the actor's ``refuse`` hook takes them back out of the ledger at once, in
the same step as the barriers of duplicates (and of ``costs`` batches) that
relied on them are refused too, so that a resend counts once.
The hook then queues today's patch, which is the probe: the store is retried
with backoff until it takes it, and health is ``degraded`` until then.

The queue, the in-memory waiting jobs and the spill file live in
:class:`PersistQueue`, which outlives any one run of the persister, so a
restarted persister resumes exactly where the failed one stopped. Writes are
idempotent (journal rows by seq and id, nudges by name, patches by upsert), so
re-writing a batch that did commit is harmless.

Cancellation: a write in progress completes or reaches its deadline (it is
shielded); unwritten jobs stay in the queue for :meth:`Persister.final_flush`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

import msgspec
import trio

from ..core.records import Alert, JournalEntry, Snapshot
from ..core.views import Admission
from ..stores.spill import SpillFile
from ..stores.store import JournalBatch, Store, StoreError
from .messages import Admit, BatchReceipt, CostReceipt, Message, Reply, StoreReport, Uncount
from .stats import ServiceStats

log = logging.getLogger("budget_actor.persister")

T = TypeVar("T")

# The actor's hook for refused costs (see the module's docstring).
RefuseHook = Callable[[list[JournalEntry]], None]

# Upper bound on jobs per transaction: large enough that group commit amortises
# the fsync (one commit for thousands of costs), small enough that one
# transaction never holds the store for long.
MAX_BATCH = 5000
# First retry after a failed write, doubling up to RETRY_MAX_S: a blip costs
# 50 ms, a long outage costs one connection attempt every 2 s.
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0
# At shutdown, a store that has not answered this long before the deadline is
# given up on, leaving time to spill what it did not take.
SPILL_RESERVE_S = 2.0
# While writes keep failing, every refused batch would log a line (and the
# log may live on the very disk that is full): one line per interval, with
# the count since the last one.
REFUSAL_LOG_EVERY_S = 10.0


class JournalJob(msgspec.Struct):
    entry: JournalEntry
    receipt: CostReceipt | None
    # trio time at which the actor counted the cost (one reading per
    # wake-up of the actor), for the ack latency histogram.
    counted_at: float = 0.0
    # A cost of a `costs` batch: its answer is item `index` of `batch`, made
    # durable by the batch's barrier job (receipt is None).
    batch: BatchReceipt | None = None
    index: int = 0


class PatchJob(msgspec.Struct):
    snapshot: Snapshot


class NudgeJob(msgspec.Struct):
    alert: Alert
    # "inserted", "exists" or "premature": see WriteResult.
    reply: Reply[str] | None


class BarrierJob(msgspec.Struct):
    """Completes when every job before it is durable (acks of duplicates)."""

    receipt: CostReceipt


class CheckJob(msgspec.Struct):
    """Ask the store whether ``admit``'s dispatch id was counted in the dedupe
    window of ``day``, once every job before it is written; the admission
    goes back to the actor with the answer."""

    admit: Admit
    day: str

    @property
    def reply(self) -> Reply[Admission]:
        return self.admit.reply


Job = JournalJob | PatchJob | NudgeJob | BarrierJob | CheckJob


class PersistQueue:
    """The persister's inbox, in-flight batch, held jobs and spill file.

    Survives persister restarts. The inbox is unbounded on purpose: the actor
    must never block on the store. It is a plain deque with a parking lot, not
    a memory channel: the actor puts one job per cost, and a deque append is
    several times cheaper than a channel send on that hot path.
    """

    def __init__(self, spill: SpillFile | None = None) -> None:
        self._inbox: deque[Job] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.batch: list[Job] = []
        # Patches and nudges waiting for the store while the journal spills.
        self.held: list[Job] = []
        self.spill = spill

    def put(self, job: Job) -> None:
        self._inbox.append(job)
        if self._lot:
            self._lot.unpark()

    def fill(self) -> None:
        inbox, batch = self._inbox, self.batch
        while inbox and len(batch) < MAX_BATCH:
            batch.append(inbox.popleft())

    def take_all(self) -> list[Job]:
        """Everything in the inbox, in order (for the final flush)."""
        jobs = list(self._inbox)
        self._inbox.clear()
        return jobs

    def hold(self, job: Job) -> None:
        """Keep a patch or nudge until the store is back."""
        if isinstance(job, PatchJob):
            # Only the newest patch of a day is written (see Store.write), so
            # a long outage must not pile up the ones it supersedes.
            day = job.snapshot.day
            self.held = [
                h for h in self.held if not (isinstance(h, PatchJob) and h.snapshot.day == day)
            ]
        self.held.append(job)

    def forget(self, refused: list[JournalEntry]) -> None:
        """``refused`` will never be durable: refuse every barrier that waits
        on one of them (a duplicate's ack, or a ``costs`` batch's, would vouch
        for a cost that is in no journal). Queued patches need nothing: the
        store writes a patch as the sum of what it holds."""
        seqs = {entry.seq for entry in refused}
        for job in itertools.chain(self.held, self.batch, self._inbox):
            if isinstance(job, BarrierJob):
                receipt = job.receipt
                relies = (
                    any(seq in seqs for seq in receipt.seqs)
                    if isinstance(receipt, BatchReceipt)
                    else receipt.seq in seqs
                )
                if relies:
                    receipt.refuse()

    def unfinished(self) -> list[Job]:
        """Every job not written, for failing its waiters when the service ends."""
        return self.held + self.batch + list(self._inbox)

    async def wait(self) -> None:
        """Wait until the batch is not empty."""
        while not self.batch and not self._inbox:
            await self._lot.park()
        self.fill()

    @property
    def behind(self) -> bool:
        """True while an outage is not yet caught up: spilled or held jobs wait."""
        return bool(self.held) or (self.spill is not None and self.spill.count > 0)

    @property
    def waiting(self) -> int:
        spilled = self.spill.count if self.spill is not None else 0
        return len(self.batch) + len(self.held) + spilled + len(self._inbox)


class Persister:
    def __init__(
        self,
        store: Store,
        queue: PersistQueue,
        limiter: trio.CapacityLimiter,
        clock: Callable[[], datetime],
        report: Callable[[Message], Awaitable[None]],
        stats: ServiceStats | None = None,
        *,
        refuse: RefuseHook | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.store = store
        self.queue = queue
        self.limiter = limiter
        self.clock = clock
        self.report = report
        self.stats = stats or ServiceStats()
        self.refuse = refuse
        self.timeout_s = timeout_s
        # The spill file's own: a store call abandoned at its deadline keeps
        # the store's limiter until its thread ends, and spilling must not
        # wait for that.
        self.spill_limiter = trio.CapacityLimiter(1)
        self._refusals_logged_at = -math.inf
        self._refusals_unlogged = 0

    async def run(self) -> None:
        """Commit batches until cancelled (then :meth:`final_flush` takes over)."""
        queue = self.queue
        delay = RETRY_INITIAL_S
        next_try = trio.current_time()
        while True:
            if queue.behind:
                # Outage: spill new journal entries; try the store when due.
                with trio.move_on_at(next_try):
                    await queue.wait()
                if queue.batch:
                    await self._spill_or_refuse(queue.batch)
                    queue.batch = []
                if trio.current_time() >= next_try:
                    if await self._drain():
                        delay = RETRY_INITIAL_S
                    else:
                        delay = min(delay * 2, RETRY_MAX_S)
                        next_try = trio.current_time() + delay
                continue
            await queue.wait()
            started = trio.current_time()
            try:
                await self._commit(queue.batch)
            except StoreError as exc:
                await self._tell(StoreReport(ok=False, seq=0, at=self.clock()))
                if queue.spill is not None:
                    log.warning("store write failed (%s); spilling to %s", exc, queue.spill.path)
                    await self._spill_or_refuse(queue.batch)
                    queue.batch = []
                    next_try = trio.current_time() + delay
                else:
                    log.warning("store write failed (%s); retrying in %.2fs", exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_INITIAL_S
            done, queue.batch = queue.batch, []
            await self._report_ok(done, latency_s=trio.current_time() - started)

    async def final_flush(
        self, final_patch: Snapshot | None, extra: list[Job], *, deadline: float
    ) -> None:
        """Write everything still queued, plus ``extra``, then ``final_patch``.

        For shutdown: call it after the persister task has ended, shielded
        and under a deadline. Jobs are written in order, in transactions of
        at most :data:`MAX_BATCH`, and the final patch goes last, so a patch
        never counts costs that its transaction did not also make durable.
        If the store fails, every remaining journal entry goes to the spill
        file and the flush ends (the next start drains it, then restores);
        without a spill file it retries until the deadline cancels it. A store
        that hangs instead of failing is abandoned :data:`SPILL_RESERVE_S`
        before ``deadline`` (trio time), and the entries are spilled then.
        If the spill file cannot be written either, the flush ends with the
        jobs left in the queue: their waiters are then failed (never
        acknowledged), and their costs count when resent to the next run.
        """
        queue = self.queue
        pending = queue.held + queue.batch + queue.take_all() + extra
        if final_patch is not None:
            pending.append(PatchJob(final_patch))
        queue.held, queue.batch = [], []
        delay = RETRY_INITIAL_S
        give_up_at = deadline - SPILL_RESERVE_S
        while pending or queue.behind:
            chunk = pending[:MAX_BATCH]
            try:
                with trio.move_on_at(give_up_at) as attempt:
                    if queue.behind:
                        await self._drain(raise_errors=True, until=give_up_at)
                    if chunk:
                        await self._commit(chunk, until=give_up_at, final=True)
                if attempt.cancelled_caught:
                    raise StoreError("the store did not answer before the shutdown deadline")
            except StoreError as exc:
                if queue.spill is not None:
                    # Every acknowledged cost is now in the spill file, and the
                    # next start drains it before restoring. Waiting for the
                    # store would only delay the shutdown.
                    try:
                        await self._spill(pending)
                    except OSError as spill_exc:
                        log.error(
                            "store unreachable at shutdown (%s) and spill file %s not writable"
                            " (%s); %d jobs not written, their costs not acknowledged",
                            exc,
                            queue.spill.path,
                            spill_exc,
                            len(pending),
                        )
                        queue.batch = pending
                        return
                    log.warning(
                        "store unreachable at shutdown (%s); %d costs wait in %s",
                        exc,
                        queue.spill.count,
                        queue.spill.path,
                    )
                    return
                log.warning("final flush failed (%s); retrying in %.2fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:
                # Not an outage but a bug: retrying would fail the same way,
                # and raising here would hide the error that stopped the service.
                log.exception("final flush failed; %d jobs not written", len(pending))
                queue.batch = pending
                return
            del pending[:MAX_BATCH]

    async def _commit(
        self,
        batch: list[Job],
        spilled: list[JournalEntry] | None = None,
        *,
        until: float | None = None,
        final: bool = False,
    ) -> None:
        """Write ``batch`` (and ``spilled``) in one transaction, then complete
        its jobs. Raises :class:`StoreError`, also when the store has not
        answered within ``timeout_s`` (or by ``until``, trio time): the call's
        thread is then abandoned and the store interrupted. Not cancellable
        from outside while the write runs (at most until its deadline).
        ``final``: at shutdown, with nobody left to report uncounts to."""
        entries: list[JournalEntry] = list(spilled or ())
        patches: list[Snapshot] = []
        nudges: list[Alert] = []
        for job in batch:
            if isinstance(job, JournalJob):
                entries.append(job.entry)
            elif isinstance(job, PatchJob):
                patches.append(job.snapshot)
            elif isinstance(job, NudgeJob):
                nudges.append(job.alert)
        now = self.clock()
        started = trio.current_time()
        result = await self._call(
            self.store.write, JournalBatch.of(entries), patches, nudges, now, until=until
        )
        done_at = trio.current_time()
        self.stats.commit_duration.observe(done_at - started)
        duplicates = result.duplicates
        uncount: list[tuple[JournalEntry, int, str]] = []
        if duplicates:
            # Counted before (by another instance, before a restart, or long
            # enough ago to have left the ledger's cache): acknowledge them as
            # the duplicates they are, with the original's seq, and take them
            # back out of the ledger's figures.
            uncount = [(e, *duplicates[e.seq]) for e in entries if e.seq in duplicates]
            for job in batch:
                if isinstance(job, JournalJob) and job.entry.seq in duplicates:
                    if job.receipt is not None:
                        job.receipt.duplicate = True
                        job.receipt.seq = duplicates[job.entry.seq][0]
                    elif job.batch is not None:
                        job.batch.duplicates[job.index] = True
                        job.batch.seqs[job.index] = duplicates[job.entry.seq][0]
        checks: list[CheckJob] = []
        for job in batch:
            if not _acknowledge(job):
                if isinstance(job, NudgeJob) and job.reply is not None:
                    job.reply.set(result.nudges.get(job.alert.nudge_name, "exists"))
                elif isinstance(job, CheckJob):
                    checks.append(job)
        _observe_acks(self.stats, batch, done_at)
        if uncount and not final:
            # (At shutdown the actor is gone and its mailbox may be full; its
            # successor restores from the store anyway.)
            await self._tell(Uncount(uncount))
        if checks:
            await self._check(checks, abandon=final)

    async def _check(self, checks: list[CheckJob], *, abandon: bool) -> None:
        """Look the checked ids up (after the batch before them is written)
        and send each admission back to the actor with the answer. If the
        store cannot answer, the admission is refused here; at shutdown
        (``abandon``) nobody decides it any more: its caller is told so."""
        if abandon:
            for job in checks:
                job.reply.fail()
            return
        found: dict[str, tuple[int, str]] = {}
        try:
            for day in {job.day for job in checks}:
                ids = [job.admit.dispatch_id for job in checks if job.day == day]
                found |= await self._call(self.store.find, day, ids)
        except StoreError as exc:
            for job in checks:
                _unchecked(job, str(exc))
            return
        for job in checks:
            job.admit.checked = True
            job.admit.counted = found.get(job.admit.dispatch_id)
            await self._tell(job.admit)

    async def _call(self, fn: Callable[..., T], *args: object, until: float | None = None) -> T:
        """``fn(*args)`` on the store, in a worker thread. Raises what it
        raises, and :class:`StoreError` when it has not answered within
        ``timeout_s`` (or by ``until``, trio time): its thread is then
        abandoned and the store interrupted, so that it lets the store go.
        Shielded: cancellation waits for the call, at most until its deadline.
        """
        deadline = trio.current_time() + self.timeout_s
        if until is not None:
            deadline = min(deadline, until)
        with trio.CancelScope(deadline=deadline, shield=True) as scope:
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self.limiter, abandon_on_cancel=True
            )
        assert scope.cancelled_caught
        self.store.interrupt()
        raise StoreError(f"{self.store.kind}: no answer within {self.timeout_s:g}s")

    async def _spill(self, batch: list[Job]) -> None:
        """Journal entries to the spill file (then acknowledged); the rest is
        held. Raises ``OSError`` with nothing acknowledged or held."""
        spill = self.queue.spill
        assert spill is not None
        entries = [job.entry for job in batch if isinstance(job, JournalJob)]
        await trio.to_thread.run_sync(spill.append, entries, limiter=self.spill_limiter)
        for job in batch:
            if isinstance(job, CheckJob):
                _unchecked(job, "the store is unreachable")
            elif not _acknowledge(job):
                self.queue.hold(job)
        _observe_acks(self.stats, batch, trio.current_time())

    async def _spill_or_refuse(self, batch: list[Job]) -> None:
        """Spill ``batch``; if the spill file fails too, refuse its costs."""
        try:
            await self._spill(batch)
        except OSError as exc:
            spill = self.queue.spill
            assert spill is not None
            self._refusals_unlogged += sum(isinstance(job, JournalJob) for job in batch)
            now = trio.current_time()
            if now - self._refusals_logged_at >= REFUSAL_LOG_EVERY_S:
                log.error(
                    "cannot write the spill file %s either (%s); %d costs answered"
                    " unavailable (not counted; their senders resend them)",
                    spill.path,
                    exc,
                    self._refusals_unlogged,
                )
                self._refusals_logged_at, self._refusals_unlogged = now, 0
            self._refuse(batch)

    def _refuse(self, batch: list[Job]) -> None:
        """Neither the store nor the spill file took ``batch``: its costs are
        answered ``unavailable`` and taken back out, in one step (no await),
        so that nothing in between can count or acknowledge them; patches
        and nudges wait for the store."""
        queue = self.queue
        refused = [job.entry for job in batch if isinstance(job, JournalJob)]
        for job in batch:
            if isinstance(job, JournalJob):
                for receipt in (job.receipt, job.batch):
                    if receipt is not None:
                        receipt.refuse()
            elif isinstance(job, BarrierJob):
                job.receipt.refuse()
            elif isinstance(job, CheckJob):
                _unchecked(job, "the store is unreachable")
            else:
                queue.hold(job)
        if refused:
            queue.forget(refused)
            if self.refuse is not None:
                self.refuse(refused)

    async def _drain(self, *, raise_errors: bool = False, until: float | None = None) -> bool:
        """Move the spill file and held jobs into the store; True on success.

        A spill file that cannot be read or emptied counts as a failure
        (``raise_errors``: :class:`StoreError`); its entries stay in it, and a
        later drain writes them again, harmlessly.
        """
        queue = self.queue
        spill = queue.spill
        assert spill is not None
        try:
            spilled = await trio.to_thread.run_sync(spill.read, limiter=self.spill_limiter)
            await self._commit(queue.held, spilled, until=until, final=raise_errors)
            await trio.to_thread.run_sync(spill.clear, limiter=self.spill_limiter)
        except (StoreError, OSError) as exc:
            if raise_errors:
                if isinstance(exc, OSError):
                    raise StoreError(f"spill file {spill.path}: {exc}") from exc
                raise
            log.info("store still unreachable (%s); %d costs spilled", exc, spill.count)
            return False
        done, queue.held = queue.held, []
        log.info("store is back; %d spilled costs drained", len(spilled))
        await self._report_ok(done, max((e.seq for e in spilled), default=0))
        return True

    async def _report_ok(self, done: list[Job], seq: int = 0, latency_s: float = 0.0) -> None:
        patch_written = False
        for job in done:
            if isinstance(job, JournalJob):
                seq = max(seq, job.entry.seq)
            elif isinstance(job, PatchJob):
                patch_written = True
        report = StoreReport(
            ok=True, seq=seq, at=self.clock(), patch_written=patch_written, latency_s=latency_s
        )
        await self._tell(report)

    async def _tell(self, report: Message) -> None:
        # At shutdown the actor's mailbox is already closed; the final flush
        # has nobody left to report to, and that is fine.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.report(report)


def _observe_acks(stats: ServiceStats, batch: list[Job], now: float) -> None:
    """Ack latencies of the acknowledged costs in ``batch``, durable at ``now``.

    The actor stamps every cost of one wake-up with the same time, so the
    costs of a batch come in a few runs of equal stamps: one observation per
    run keeps this cheap on the event loop, whatever the batch size.
    """
    histogram = stats.ack_latency
    stamp = -1.0
    run = 0
    for job in batch:
        if type(job) is JournalJob and (job.receipt is not None or job.batch is not None):
            if job.counted_at != stamp:
                if run:
                    histogram.observe(now - stamp, run)
                stamp, run = job.counted_at, 0
            run += 1
    if run:
        histogram.observe(now - stamp, run)


def _unchecked(job: CheckJob, why: str) -> None:
    """Refuse an admission whose id the store could not check: it may have
    been counted already, and an admission must not reserve for a cost that
    will never settle it."""
    job.reply.set(
        Admission(
            dispatch_id=job.admit.dispatch_id,
            allowed=False,
            remaining=Decimal(0),
            reason=f"cannot check whether this dispatch_id was already counted: {why}",
        )
    )


def _acknowledge(job: Job) -> bool:
    """Mark a cost (or a duplicate's barrier) durable; False for other jobs."""
    if isinstance(job, JournalJob):
        if job.receipt is not None:
            job.receipt.durable.set()
        return True
    if isinstance(job, BarrierJob):
        job.receipt.durable.set()
        return True
    return False
