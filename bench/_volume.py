"""``volume``: a day of 1,000,000 costs. How long a real ``serve`` takes to be
ready on it and how much memory it holds then (SQLite and PostgreSQL), and
how much the memory of a running service grows per extra million costs."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import trio
from trio_websocket import open_websocket_url

import budget_actor
from budget_actor.core.cost import Cost
from budget_actor.core.ledger import day_of
from budget_actor.core.records import JournalEntry
from budget_actor.stores.open import open_store

from ._support import Child, pg_schema, pg_skipped, proc_status_kib, serve_command
from .rows import Row, median

COSTS = 1_000_000
# Rows per store.write while preparing the day: the store's bulk path (one
# statement per batch), large batches so that preparing stays a few seconds.
BULK_BATCH = 50_000
# Far below any threshold: 1,000,000 of them are 1.00 of the default cap 10.00.
USD = Decimal("0.000001")
# The instance whose share the day is (PostgreSQL): `serve` restores as it.
INSTANCE = "volume"
SERVE_ROUNDS = 3
READY_TARGET_S = 1.0
RSS_TARGET_MB = 150.0
# Memory growth while running, in process on SQLite: costs sent before the
# first reading (the cache of recent ids, 100,000, is full by then, and the
# allocator warm), then the measured costs, in chunks, each drained to the
# store before the next, so that the figure is what the service keeps, not a
# backlog in flight.
GROWTH_WARMUP = 200_000
GROWTH_COSTS = 1_000_000
GROWTH_CHUNK = 20_000
GROWTH_TARGET_MB = 50.0
# Every wait in the scenario is bounded, so that a hang fails it instead.
TIMEOUT_S = 120.0


def _write_day(url: str, day: str, now: datetime) -> float:
    """Journal COSTS costs of ``day`` through ``Store.write`` (as the service
    would, with its shares); return rows/s."""
    store = open_store(url, INSTANCE)
    store.open()
    try:
        start = time.perf_counter()
        for first in range(1, COSTS + 1, BULK_BATCH):
            entries = [
                JournalEntry(seq=seq, day=day, at=now, cost=Cost(f"vol-{seq:08d}", USD))
                for seq in range(first, min(first + BULK_BATCH, COSTS + 1))
            ]
            store.write(entries, [], [], now)
        return COSTS / (time.perf_counter() - start)
    finally:
        store.close()


async def _health(url: str) -> dict[str, object]:
    async with open_websocket_url(url) as ws:
        await ws.send_message('{"type":"health"}')
        while True:
            reply = json.loads(await ws.get_message())
            if reply.get("type") == "health":
                return dict(reply)


def _serve_rounds(url: str, tmp: Path, store_kind: str) -> tuple[list[float], list[float]]:
    """Spawn `serve` on the prepared day SERVE_ROUNDS times: seconds from
    spawn to the ready line, and VmRSS (MB) right after it."""
    ready, rss = [], []
    for n in range(SERVE_ROUNDS):
        log = tmp / f"volume-{store_kind}-{n}.log"
        spill = tmp / f"volume-{store_kind}.spill"
        command = serve_command(url, "--spill", str(spill), "--instance-id", INSTANCE)
        gc.collect()
        with Child(command, log, ready_timeout=TIMEOUT_S) as child:
            ready.append(child.ready_s)
            rss.append(proc_status_kib(child.pid, "VmRSS") / 1024)
            health = trio.run(_health, child.url)
            if health.get("dispatches") != COSTS:
                raise RuntimeError(f"serve restored {health.get('dispatches')} of {COSTS}")
    return ready, rss


def _measure_store(store_kind: str, url: str, tmp: Path) -> list[Row]:
    now = datetime.now(UTC)
    day = day_of(now, budget_actor.BudgetConfig())
    bulk = _write_day(url, day, now)
    ready, rss = _serve_rounds(url, tmp, store_kind)
    state = (
        f"{COSTS:,} costs journaled today by Store.write in batches of {BULK_BATCH:,} "
        f"({bulk:,.0f} rows/s, with the shares and the dedupe keys)"
    )
    return [
        Row(
            scenario="volume",
            figure=f"{store_kind}: `serve` spawn to ready, 1,000,000 costs today",
            value=median(ready),
            unit="s",
            at_most=READY_TARGET_S,
            samples=tuple(ready),
            note=(
                f"median of {SERVE_ROUNDS} rounds; {state}. subprocess.Popen of `python -m "
                "budget_actor serve --port 0` until its ready line; includes starting the "
                "interpreter and the imports. Each round then checks the restored day "
                "(health over the WebSocket: 1,000,000 dispatches) and stops the service."
            ),
        ),
        Row(
            scenario="volume",
            figure=f"{store_kind}: `serve` RSS when ready, 1,000,000 costs today",
            value=median(rss),
            unit="MB",
            at_most=RSS_TARGET_MB,
            samples=tuple(rss),
            note="VmRSS of the serve process read right after its ready line, per round.",
        ),
    ]


async def _drain(budget: budget_actor.Budget) -> None:
    """Wait until every cost sent is durable."""
    with trio.fail_after(TIMEOUT_S):
        while (await budget.health()).pending:
            await trio.sleep(0.05)


def _rss_mb() -> float:
    gc.collect()
    return proc_status_kib(os.getpid(), "VmRSS") / 1024


async def _growth(url: str, spill: Path) -> tuple[float, float, float]:
    """RSS (MB) after GROWTH_WARMUP costs and after GROWTH_COSTS more, and
    the ingest rate of the measured part (costs/s, drains included)."""
    async with budget_actor.open_budget(database=url, spill=spill) as budget:
        sent = 0

        async def send(count: int) -> None:
            nonlocal sent
            for _ in range(count // GROWTH_CHUNK):
                for i in range(sent, sent + GROWTH_CHUNK):
                    await budget.send_cost(f"grow-{i:08d}", USD)
                sent += GROWTH_CHUNK
                await _drain(budget)

        await send(GROWTH_WARMUP)
        before = _rss_mb()
        start = time.perf_counter()
        await send(GROWTH_COSTS)
        rate = GROWTH_COSTS / (time.perf_counter() - start)
        after = _rss_mb()
        health = await budget.health()
    if health.dispatches != GROWTH_WARMUP + GROWTH_COSTS:
        raise RuntimeError(f"counted {health.dispatches} of {GROWTH_WARMUP + GROWTH_COSTS}")
    return before, after, rate


def _growth_row(tmp: Path) -> Row:
    url = f"sqlite:///{tmp / 'growth.db'}"
    before, after, rate = trio.run(_growth, url, tmp / "growth.spill")
    per_million = (after - before) / (GROWTH_COSTS / 1_000_000)
    return Row(
        scenario="volume",
        figure="sqlite: RSS growth while running, per extra 1,000,000 costs",
        value=per_million,
        unit="MB",
        at_most=GROWTH_TARGET_MB,
        note=(
            f"in process: open_budget() on SQLite, {GROWTH_WARMUP:,} costs by send_cost, "
            f"then VmRSS {before:.1f} MB; {GROWTH_COSTS:,} more (chunks of {GROWTH_CHUNK:,}, "
            f"each drained to the store before the next: {rate:,.0f} costs/s), then VmRSS "
            f"{after:.1f} MB (gc.collect() before each reading). The cache of recent ids "
            "(100,000) is full before the first reading."
        ),
        extra={"rss_before_mb": before, "rss_after_mb": after},
    )


def volume() -> list[Row]:
    """A day of 1,000,000 costs: `serve` ready time and RSS; RSS growth per million."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        rows.extend(_measure_store("sqlite", f"sqlite:///{Path(tmp, 'volume.db')}", Path(tmp)))
        try:
            with pg_schema() as url:
                rows.extend(_measure_store("postgresql", url, Path(tmp)))
        except psycopg.OperationalError as exc:
            rows.append(pg_skipped("volume", exc))
        rows.append(_growth_row(Path(tmp)))
    return rows
