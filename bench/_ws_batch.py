"""``ws-batch`` and ``client``: acked costs/s over one connection in ``costs``
batches, and through the client library.

``ws-batch``: batches of 100 over one pipelining connection against single
``cost`` frames (the ``ws-ingest`` client), on the same service, alternating;
beside them the store's bulk-insert limit (the SQLite store's own ``write`` of
the persister's largest transaction), which caps any durable ack rate.

``client``: acked costs/s through ``BudgetClient.enqueue`` (asyncio and trio,
without an outbox; asyncio with an outbox), next to a raw batch round on the
same service.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import trio

import budget_actor
from budget_actor.client import BudgetClient
from budget_actor.core.cost import Cost
from budget_actor.core.ledger import day_of
from budget_actor.core.records import JournalEntry
from budget_actor.runtime.persister import MAX_BATCH as PERSIST_BATCH
from budget_actor.stores.open import open_store
from budget_actor.stores.store import JournalBatch

from ._support import Child, serve_command
from ._ws_ingest import _pipeline, pipelined
from .rows import Row, median

BATCH = 100
# Batches in flight before the sender waits for an acks: enough that the
# service's group commit always has the next batches waiting.
BATCH_WINDOW = 100
ROUNDS = 3
# A batch round moves tens of thousands of costs in this time; a single-frame
# round a few thousand. Both sides and a warm-up: ~15 s for the scenario.
ROUND_S = 2.0
WARMUP_S = 0.5
BATCH_TARGET = 50_000.0
BATCH_TARGET_RATIO = 10.0
USD = "0.000001"
# The bulk-insert probe: transactions of the persister's largest size.
BULK_ROUNDS = 3
BULK_ENTRIES = PERSIST_BATCH

# The client scenario: costs enqueued per measured round, and how many tasks
# enqueue at once (without an outbox each enqueue waits for its ack, so the
# rate is concurrency / latency: this many keep the window full).
CLIENT_COSTS = 20_000
CLIENT_TASKS = 2_000
CLIENT_ROUND_TIMEOUT_S = 120.0


async def _batches(url: str, seconds: float, prefix: str) -> tuple[int, float]:
    """``costs`` frames of BATCH items, at most BATCH_WINDOW unacknowledged:
    (costs acked, seconds from the first send to the last acks)."""

    def batch(n: int) -> str:
        items = ",".join(
            f'{{"dispatch_id":"{prefix}-{n * BATCH + i:08d}","usd":"{USD}"}}' for i in range(BATCH)
        )
        return f'{{"type":"costs","costs":[{items}]}}'

    return await pipelined(url, seconds, batch, BATCH_WINDOW)


def _bulk_insert(directory: Path) -> list[float]:
    """Rows/s of the SQLite store's own write of BULK_ENTRIES journal entries
    in one transaction (pre-encoded, as the persister hands them over)."""
    rates = []
    now = datetime.now(UTC)
    day = day_of(now, budget_actor.BudgetConfig())
    store = open_store(f"sqlite:///{directory / 'bulk.db'}")
    store.open()
    try:
        seq = 0
        for _ in range(BULK_ROUNDS + 1):  # the first is a warm-up
            entries = []
            for _ in range(BULK_ENTRIES):
                seq += 1
                entries.append(
                    JournalEntry(seq=seq, day=day, at=now, cost=Cost(f"bulk-{seq:08d}", Decimal(1)))
                )
            batch = JournalBatch.of(entries)
            start = time.perf_counter()
            store.write(batch, [], [], now)
            rates.append(BULK_ENTRIES / (time.perf_counter() - start))
    finally:
        store.close()
    return rates[1:]


def ws_batch() -> list[Row]:
    """Batches of 100 vs. single cost frames over one connection, same service."""
    rates: dict[str, list[float]] = {"batch": [], "single": []}
    counts: dict[str, list[int]] = {"batch": [], "single": []}
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        bulk = _bulk_insert(Path(tmp))
        with Child(serve_command(f"sqlite:///{Path(tmp, 'ws.db')}"), Path(tmp, "s.log")) as svc:
            runs: dict[str, Callable[[str, float, str], tuple[int, float]]] = {
                "batch": lambda url, s, p: trio.run(_batches, url, s, p),
                "single": lambda url, s, p: trio.run(_pipeline, url, s, p),
            }

            def one_round(side: str, seconds: float, prefix: str) -> None:
                gc.collect()
                acked, elapsed = runs[side](svc.url, seconds, f"{side}-{prefix}")
                if seconds != WARMUP_S:
                    rates[side].append(acked / elapsed)
                    counts[side].append(acked)

            one_round("batch", WARMUP_S, "warm")
            one_round("single", WARMUP_S, "warm")
            for round_no in range(ROUNDS):
                sides = ("batch", "single") if round_no % 2 == 0 else ("single", "batch")
                for side in sides:
                    one_round(side, ROUND_S, f"r{round_no}")
    batch, single, limit = median(rates["batch"]), median(rates["single"]), median(bulk)
    rounds = f"median of {ROUNDS} alternating rounds of {ROUND_S} s after a {WARMUP_S} s warm-up"
    server = (
        "`python -m budget_actor serve` in its own process on a temporary SQLite file "
        "(WAL, synchronous=FULL); acks only once durable"
    )
    return [
        Row(
            scenario="ws-batch",
            figure=f"1 connection, costs batches of {BATCH} -> acks",
            value=batch,
            unit="costs/s",
            at_least=BATCH_TARGET,
            samples=tuple(rates["batch"]),
            note=(
                f"{rounds}. {server}. One trio-websocket client, at most {BATCH_WINDOW} "
                f"batches unacknowledged; per round {', '.join(f'{n:,}' for n in counts['batch'])}"
                " costs acked. The target holds where the store allows: see the bulk-insert "
                "row."
            ),
        ),
        Row(
            scenario="ws-batch",
            figure="1 connection, single cost frames -> ack",
            value=single,
            unit="costs/s",
            samples=tuple(rates["single"]),
            note=f"{rounds}. The ws-ingest client (at most 1,024 unacked), same service.",
        ),
        Row(
            scenario="ws-batch",
            figure="ratio batches/single frames",
            value=batch / single,
            unit="",
            at_least=BATCH_TARGET_RATIO,
            samples=tuple(b / s for b, s in zip(rates["batch"], rates["single"], strict=True)),
            note="ratio of the two medians; samples are per-round ratios.",
        ),
        Row(
            scenario="ws-batch",
            figure=f"store bulk-insert limit (SQLite, {BULK_ENTRIES:,} rows/transaction)",
            value=limit,
            unit="rows/s",
            samples=tuple(bulk),
            note=(
                f"median of {BULK_ROUNDS} transactions (after a warm-up) of the SQLite store's "
                f"own write() of {BULK_ENTRIES:,} pre-encoded journal entries "
                "(the persister's largest batch), in this process, on a temporary file: "
                "no durable ack rate can exceed it."
            ),
        ),
    ]


async def _enqueue_round(url: str, prefix: str, outbox: Path | None) -> float:
    """Costs/s through ``enqueue`` from CLIENT_TASKS tasks, until all are
    acknowledged (``flush``)."""
    async with BudgetClient(url, outbox=outbox) as client:
        with anyio.fail_after(CLIENT_ROUND_TIMEOUT_S):
            start = time.perf_counter()
            per_task = CLIENT_COSTS // CLIENT_TASKS

            async def task(k: int) -> None:
                for i in range(per_task):
                    await client.enqueue(f"{prefix}-{k}-{i}", USD)

            async with anyio.create_task_group() as tasks:
                for k in range(CLIENT_TASKS):
                    tasks.start_soon(task, k)
            await client.flush()
            return per_task * CLIENT_TASKS / (time.perf_counter() - start)


def client() -> list[Row]:
    """Acked costs/s through BudgetClient.enqueue, next to raw batches."""
    sides = ("asyncio", "trio", "asyncio+outbox", "raw batches")
    rates: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        with Child(serve_command(f"sqlite:///{Path(tmp, 'c.db')}"), Path(tmp, "s.log")) as svc:
            rounds = 0

            def one_round(side: str, measured: bool = True) -> None:
                nonlocal rounds
                rounds += 1
                gc.collect()
                prefix = f"c{rounds}"
                if side == "raw batches":
                    acked, elapsed = trio.run(_batches, svc.url, ROUND_S, prefix)
                    rate = acked / elapsed
                else:
                    backend = side.split("+")[0]
                    outbox = Path(tmp, f"{prefix}.outbox") if "outbox" in side else None
                    rate = anyio.run(_enqueue_round, svc.url, prefix, outbox, backend=backend)
                if measured:
                    rates[side].append(rate)

            one_round("asyncio", measured=False)  # warm-up
            for round_no in range(ROUNDS):
                for side in sides if round_no % 2 == 0 else sides[::-1]:
                    one_round(side)
    raw = median(rates["raw batches"])
    how = (
        f"median of {ROUNDS} rounds of {CLIENT_COSTS:,} costs from {CLIENT_TASKS:,} tasks "
        "(sides alternating), clock from the first enqueue until flush() returns (every cost "
        "acknowledged); the client batches by itself (up to 1,000 per frame, 4,000 in flight)"
    )
    rows = [
        Row(
            scenario="client",
            figure=f"enqueue, {side.replace('+outbox', ', with an outbox')}",
            value=median(rates[side]),
            unit="costs/s",
            samples=tuple(rates[side]),
            note=(
                f"{how}. "
                + (
                    "With an outbox enqueue returns once the cost is fsync'd to the local SQLite "
                    "file (one transaction per group of waiting enqueues); acked rows are "
                    "deleted in later transactions."
                    if "outbox" in side
                    else f"Without an outbox enqueue returns once acknowledged ({side} loop)."
                )
            ),
        )
        for side in sides[:3]
    ]
    rows.append(
        Row(
            scenario="client",
            figure=f"raw costs batches of {BATCH} (the ws-batch client), same service",
            value=raw,
            unit="costs/s",
            samples=tuple(rates["raw batches"]),
            note=f"median of {ROUNDS} rounds of {ROUND_S} s, alternating with the client rounds.",
        )
    )
    rows.append(
        Row(
            scenario="client",
            figure="ratio enqueue (asyncio, no outbox)/raw batches",
            value=median(rates["asyncio"]) / raw,
            unit="",
            note="ratio of the two medians.",
        )
    )
    return rows
