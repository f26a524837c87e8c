"""The persister: the only task that writes to the store.

It takes jobs from its queue (journal entries of accepted costs, budget
patches, nudge rows, barriers) and group-commits whatever is waiting in one
transaction, in a worker thread. Then it completes the jobs: a cost's receipt
becomes ``durable`` (so its ``ack`` may go out), a nudge's reply says whether
the row was new. It reports each success or failure to the actor, which turns
health ``degraded`` while the store fails and ``ok`` once it has caught up.

A failed write is retried with backoff for as long as it takes; jobs keep
queueing meanwhile and join the next attempt. The queue and the in-flight batch
live in :class:`PersistQueue`, which outlives any one run of the persister, so a
restarted persister resumes exactly where the failed one stopped. Writes are
idempotent (journal rows by seq, nudges by name, patches by upsert), so
re-writing a batch that did commit is harmless.

Cancellation: a write in progress always completes (trio waits for the worker
thread); the batch then stays in the queue for :meth:`Persister.final_flush`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec
import trio

from ._messages import CostReceipt, Reply, StoreReport
from ._records import Alert, JournalEntry, Snapshot
from ._store import Store, StoreError

log = logging.getLogger("budget_actor.persister")

# Upper bound on jobs per transaction: large enough that group commit amortises
# the fsync (one commit for thousands of costs), small enough that one
# transaction never holds the store for long after an outage.
MAX_BATCH = 5000
# First retry after a failed write, doubling up to RETRY_MAX_S: a blip costs
# 50 ms, a long outage costs one connection attempt every 2 s.
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0


class JournalJob(msgspec.Struct):
    entry: JournalEntry
    receipt: CostReceipt | None


class PatchJob(msgspec.Struct):
    snapshot: Snapshot


class NudgeJob(msgspec.Struct):
    alert: Alert
    reply: Reply[bool] | None


class BarrierJob(msgspec.Struct):
    """Completes when every job before it is durable (acks of duplicates)."""

    receipt: CostReceipt


Job = JournalJob | PatchJob | NudgeJob | BarrierJob


class PersistQueue:
    """The persister's inbox and in-flight batch; survives persister restarts.

    The inbox is unbounded on purpose: the actor must never block on the store.
    During an outage it holds what the store has not yet taken.
    """

    def __init__(self) -> None:
        self.send, self._recv = trio.open_memory_channel[Job](math.inf)
        self.batch: list[Job] = []

    def put(self, job: Job) -> None:
        self.send.send_nowait(job)

    def fill(self) -> None:
        while len(self.batch) < MAX_BATCH:
            try:
                self.batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    async def wait(self) -> bool:
        """Wait until the batch is not empty; False once the inbox is closed and empty."""
        if not self.batch:
            try:
                self.batch.append(await self._recv.receive())
            except trio.EndOfChannel:
                return False
        self.fill()
        return True

    @property
    def waiting(self) -> int:
        return len(self.batch) + self._recv.statistics().current_buffer_used


class Persister:
    def __init__(
        self,
        store: Store,
        queue: PersistQueue,
        limiter: trio.CapacityLimiter,
        clock: Callable[[], datetime],
        report: Callable[[StoreReport], Awaitable[None]],
    ) -> None:
        self.store = store
        self.queue = queue
        self.limiter = limiter
        self.clock = clock
        self.report = report

    async def run(self) -> None:
        """Commit batches until the queue's inbox is closed and drained."""
        delay = RETRY_INITIAL_S
        while await self.queue.wait():
            try:
                await self._commit(self.queue.batch)
            except StoreError as exc:
                log.warning("store write failed (%s); retrying in %.2fs", exc, delay)
                await self.report(StoreReport(ok=False, seq=0, at=self.clock()))
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_INITIAL_S
            done, self.queue.batch = self.queue.batch, []
            seq, patch_written = _summary(done)
            await self.report(
                StoreReport(ok=True, seq=seq, at=self.clock(), patch_written=patch_written)
            )

    async def final_flush(self, final_patch: Snapshot | None, extra: list[Job]) -> None:
        """Write everything still queued, plus ``extra`` and ``final_patch``.

        For shutdown: call it after the persister task has ended, shielded
        and under a deadline. Retries until it succeeds or the deadline
        cancels it; whatever was not written then was never acknowledged.
        """
        queue = self.queue
        queue.batch.extend(extra)
        if final_patch is not None:
            queue.batch.append(PatchJob(final_patch))
        delay = RETRY_INITIAL_S
        while True:
            queue.fill()
            if not queue.batch:
                return
            try:
                await self._commit(queue.batch)
            except StoreError as exc:
                log.warning("final flush failed (%s); retrying in %.2fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:
                # Not an outage but a bug: retrying would fail the same way,
                # and raising here would hide the error that stopped the service.
                log.exception("final flush failed; %d jobs not written", len(queue.batch))
                return
            queue.batch = []

    async def _commit(self, batch: list[Job]) -> None:
        entries: list[JournalEntry] = []
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
        inserted = await trio.to_thread.run_sync(
            self.store.write, entries, patches, nudges, now, limiter=self.limiter
        )
        for job in batch:
            if isinstance(job, JournalJob):
                if job.receipt is not None:
                    job.receipt.durable.set()
            elif isinstance(job, BarrierJob):
                job.receipt.durable.set()
            elif isinstance(job, NudgeJob) and job.reply is not None:
                job.reply.set(job.alert.nudge_name in inserted)


def _summary(batch: list[Job]) -> tuple[int, bool]:
    seq = 0
    patch_written = False
    for job in batch:
        if isinstance(job, JournalJob):
            seq = max(seq, job.entry.seq)
        elif isinstance(job, PatchJob):
            patch_written = True
    return seq, patch_written
