"""The benchmark scenarios, one function each, registered in :data:`SCENARIOS`.

A scenario takes no arguments, runs for a bounded time (the whole suite must
stay under 4 minutes on a 2-core machine) and returns its figures as
:class:`~bench.rows.Row` objects. To add one, write ``def name() -> list[Row]``
and add it to the registry. ``ingest`` is here; the others are in their own
modules: ``_durable`` (durable, naive), ``_ws_ingest``, ``_fanout``,
``_restore``, ``_shared``, ``_shared_admit``, ``_ws_batch`` (ws-batch, client),
``_volume``, ``_hostile_frames``; what they share is in ``_support``.
``ws_echo.py`` and ``fanout_subscribers.py`` are scripts that scenarios run as
child processes.

Time budget per scenario on the reference machine: ingest ≤ 25 s, durable
≤ 40 s, naive ≤ 15 s, ws-ingest ≤ 25 s, fanout ≤ 45 s, restore ≤ 20 s,
shared ≤ 45 s, shared-admit ≤ 10 s, ws-batch ≤ 20 s, client ≤ 30 s, volume
≤ 150 s (it first writes a day of a million costs on each store),
hostile-frames ≤ 15 s.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import trio

import budget_actor
from budget_actor.core.cost import Cost
from budget_actor.runtime.actor import MAX_BATCH
from budget_actor.runtime.messages import RecordCost
from budget_actor.runtime.service import MAILBOX_SIZE

from ._durable import durable, naive
from ._fanout import fanout
from ._hostile_frames import hostile_frames
from ._restore import restore
from ._shared import shared
from ._shared_admit import shared_admit
from ._volume import volume
from ._ws_batch import client, ws_batch
from ._ws_ingest import ws_ingest
from .rows import Row, median

Scenario = Callable[[], list[Row]]

# -- ingest -------------------------------------------------------------------

# The actor has ingested 11,000-120,000 costs/s on the reference 2-core machine
# as the package changed, so one actor round takes 0.7-7 s and the scenario
# (warm-up, 3 rounds per side, service start-up and final flush) 8-30 s.
INGEST_COSTS = 80_000
INGEST_WARMUP_COSTS = 5_000
INGEST_ROUNDS = 3
INGEST_TARGET_RATIO = 0.7
# Per measured side: far above the expected few seconds, so that a hang fails
# the suite instead of stalling it.
INGEST_ROUND_TIMEOUT_S = 60.0
# Small enough that the day's spend stays under the default alert threshold
# (80% of 10.00 needs 400,000 such costs): no alert traffic in the measurement.
INGEST_USD = Decimal("0.00002")


def _dispatch_ids(n: int) -> list[str]:
    return [f"bench-{i:07d}" for i in range(n)]


async def _actor_ingest(dispatch_ids: list[str], usd: Decimal, database: str) -> tuple[float, int]:
    """Send every cost through ``Budget.send_cost``; return (seconds, pending).

    The clock runs from the first send until the reply to a ``health()`` sent
    after the last cost: the actor handles its mailbox in order, so the reply
    means every cost has been validated, queued, counted by the ledger and
    handed to the persister. ``pending`` is how many were not yet durable then.
    Opening (restore) and closing (final flush) the service are outside the clock.
    """
    async with budget_actor.open_budget(budget_actor.BudgetConfig(), database=database) as budget:
        with trio.fail_after(INGEST_ROUND_TIMEOUT_S):
            start = time.perf_counter()
            for dispatch_id in dispatch_ids:
                await budget.send_cost(dispatch_id, usd)
            health = await budget.health()
            elapsed = time.perf_counter() - start
    if health.dispatches != len(dispatch_ids):
        raise RuntimeError(f"actor counted {health.dispatches} of {len(dispatch_ids)} costs")
    return elapsed, health.pending


async def _bare_ingest(messages: list[RecordCost]) -> float:
    """Carry the same messages through a bare trio memory channel; return seconds.

    Same buffer size as the mailbox and the actor's drain pattern (``await
    receive()``, then ``receive_nowait()`` until ``WouldBlock``, at most
    ``MAX_BATCH`` messages per wake-up; ``EndOfChannel`` too, as the sender
    closes after the last one), with no handling at all. The clock stops when
    the receiver has seen every message.
    """
    n = len(messages)
    send, receive_channel = trio.open_memory_channel[RecordCost](MAILBOX_SIZE)
    done_at = 0.0

    async def receiver() -> None:
        nonlocal done_at
        receive = receive_channel.receive
        receive_nowait = receive_channel.receive_nowait
        seen = 0
        while seen < n:
            await receive()
            seen += 1
            for _ in range(MAX_BATCH - 1):
                try:
                    receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                seen += 1
        done_at = time.perf_counter()

    with trio.fail_after(INGEST_ROUND_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            start = time.perf_counter()
            async with send:
                for message in messages:
                    await send.send(message)
    return done_at - start


def ingest() -> list[Row]:
    """Costs/s into the real actor via ``send_cost`` vs. a bare channel loop."""
    dispatch_ids = _dispatch_ids(INGEST_COSTS)
    # Built exactly as Budget.submit builds them for a fire-and-forget cost.
    messages = [RecordCost(Cost(dispatch_id, INGEST_USD)) for dispatch_id in dispatch_ids]
    actor_rates: list[float] = []
    bare_rates: list[float] = []
    pending: list[int] = []
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        databases = iter(Path(tmp, f"round-{i}", "bench.db") for i in range(INGEST_ROUNDS + 1))

        def actor_round(ids: list[str]) -> tuple[float, int]:
            path = next(databases)
            path.parent.mkdir()
            gc.collect()
            return trio.run(_actor_ingest, ids, INGEST_USD, f"sqlite:///{path}")

        def bare_round(msgs: list[RecordCost]) -> float:
            gc.collect()
            return trio.run(_bare_ingest, msgs)

        # Warm-up (not reported): imports, first SQLite file, allocator.
        actor_round(dispatch_ids[:INGEST_WARMUP_COSTS])
        bare_round(messages[:INGEST_WARMUP_COSTS])
        for round_no in range(INGEST_ROUNDS):
            # Alternate which side goes first so neither always runs on a
            # warmer (or more throttled) machine.
            sides = ("actor", "bare") if round_no % 2 == 0 else ("bare", "actor")
            for side in sides:
                if side == "actor":
                    seconds, left = actor_round(dispatch_ids)
                    actor_rates.append(INGEST_COSTS / seconds)
                    pending.append(left)
                else:
                    bare_rates.append(INGEST_COSTS / bare_round(messages))

    actor = median(actor_rates)
    bare = median(bare_rates)
    ratios = tuple(a / b for a, b in zip(actor_rates, bare_rates, strict=True))
    rounds = f"median of {INGEST_ROUNDS} alternating rounds of {INGEST_COSTS:,} costs"
    return [
        Row(
            scenario="ingest",
            figure="actor, send_cost from 1 task",
            value=actor,
            unit="costs/s",
            samples=tuple(actor_rates),
            note=(
                f"{rounds}, end to end: clock stops at the reply to health() sent after the "
                "last cost (whose dispatch count is checked). Includes the validation of "
                "dispatch_id and usd in send_cost (part of the real path), the ledger and the "
                "persister queue, with the persister "
                "writing to SQLite (WAL, synchronous=FULL, temporary file) in its thread "
                "meanwhile; not included: waiting for durability "
                f"(still pending at stop, per round: {', '.join(f'{p:,}' for p in pending)})."
            ),
            extra={"pending_at_stop": pending},
        ),
        Row(
            scenario="ingest",
            figure="bare channel loop, same messages",
            value=bare,
            unit="msgs/s",
            samples=tuple(bare_rates),
            note=(
                f"{rounds}: pre-built RecordCost objects, await send() into a channel of "
                f"MAILBOX_SIZE={MAILBOX_SIZE}, drained with receive()/receive_nowait() "
                f"(batches of up to {MAX_BATCH}) doing nothing else; clock stops when the "
                "receiver has seen every message."
            ),
        ),
        Row(
            scenario="ingest",
            figure="ratio actor/bare",
            value=actor / bare,
            unit="",
            at_least=INGEST_TARGET_RATIO,
            samples=ratios,
            note="ratio of the two medians; samples are the per-round ratios.",
        ),
    ]


SCENARIOS: dict[str, Scenario] = {
    "ingest": ingest,
    # `naive` reports durable/naive from the `durable` figures of the same run,
    # so it comes after it.
    "durable": durable,
    "naive": naive,
    "ws-ingest": ws_ingest,
    "ws-batch": ws_batch,
    "client": client,
    "fanout": fanout,
    "restore": restore,
    "shared": shared,
    "shared-admit": shared_admit,
    "volume": volume,
    "hostile-frames": hostile_frames,
}
