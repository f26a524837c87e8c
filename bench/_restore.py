"""``restore``: time from start to ready with 100,000 costs journaled today and
the last budget patch 10 cycles (1,000 costs) back."""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import trio

import budget_actor
from budget_actor.core.cost import Cost
from budget_actor.core.ledger import day_of
from budget_actor.core.records import JournalEntry, Snapshot
from budget_actor.stores.open import open_store

from ._support import Child, pg_schema, pg_skipped, serve_command
from .rows import Row, median

COSTS = 100_000
# The patch is written every 10 cycles; at ~100 costs per cycle the last one is
# 1,000 costs behind the journal.
BEHIND = 1_000
COSTS_PER_CYCLE = 100
USD = Decimal("0.00002")  # 100,000 of them: 2.00, under the 80% alert of 10.00
IN_PROCESS_ROUNDS = {"sqlite": 5, "postgresql": 3}
SERVE_ROUNDS = {"sqlite": 3, "postgresql": 2}
EMPTY_ROUNDS = 2
TARGET_S = 1.0


def _patch(day: str) -> Snapshot:
    seq = COSTS - BEHIND
    return Snapshot(
        day=day,
        daily_spend=USD * seq,
        daily_cap=Decimal("10.00"),
        cycle_count=seq // COSTS_PER_CYCLE,
        dispatches=seq,
        alerts_sent=(),
        seq=seq,
    )


def _prepare(url: str) -> tuple[Snapshot, float]:
    """Journal COSTS costs for today and a patch BEHIND costs back, with the
    store API; return the patch and how long store.load() takes on it."""
    now = datetime.now(UTC)
    day = day_of(now, budget_actor.BudgetConfig())
    entries = [
        JournalEntry(seq=i, day=day, at=now, cost=Cost(f"restore-{i:07d}", USD))
        for i in range(1, COSTS + 1)
    ]
    patch = _patch(day)
    store = open_store(url)
    store.open()
    try:
        store.write(entries, [patch], [], now)
        start = time.perf_counter()
        restored = store.load(day)
        load_s = time.perf_counter() - start
    finally:
        store.close()
    # Both stores restore the service's share row, exact with its journal
    # rows, instead of replaying the journal after the patch; no dispatch id
    # is loaded (the store's unique keys dedupe).
    if restored.entries or restored.patch is None or restored.patch.dispatches != COSTS:
        raise RuntimeError(f"prepared store restores {len(restored.entries)} entries")
    return patch, load_s


def _reset(url: str, patch: Snapshot) -> None:
    """Put the patch back: each run's shutdown writes a newer one."""
    store = open_store(url)
    store.open()
    try:
        store.write([], [patch], [], datetime.now(UTC))
    finally:
        store.close()


async def _open_to_health(url: str, spill: Path) -> float:
    start = time.perf_counter()
    async with budget_actor.open_budget(database=url, spill=spill) as budget:
        health = await budget.health()
        elapsed = time.perf_counter() - start
    if health.dispatches != COSTS or health.daily_spend != USD * COSTS:
        raise RuntimeError(f"restored {health.dispatches} dispatches, {health.daily_spend}")
    return elapsed


def _rounds(n: int, url: str, patch: Snapshot, measure: Callable[[], float]) -> list[float]:
    seconds = []
    for _ in range(n):
        _reset(url, patch)
        gc.collect()
        seconds.append(measure())
    return seconds


def _measure_store(store_kind: str, url: str, tmp: Path) -> list[Row]:
    patch, load_s = _prepare(url)
    spill = tmp / f"{store_kind}.spill"
    in_process = _rounds(
        IN_PROCESS_ROUNDS[store_kind], url, patch, lambda: trio.run(_open_to_health, url, spill)
    )
    logs = iter(range(1000))

    def spawn_to_ready(database: str) -> float:
        log = tmp / f"serve-{store_kind}-{next(logs)}.log"
        with Child(serve_command(database, "--spill", str(spill)), log) as child:
            return child.ready_s

    served = _rounds(SERVE_ROUNDS[store_kind], url, patch, lambda: spawn_to_ready(url))
    state = (
        f"{COSTS:,} costs journaled today and a budget patch written with the store API "
        "(the patch is now the sum of the shares, so where it stands no longer matters to "
        "restore; it is put back before each round all the same)"
    )
    rows = [
        Row(
            scenario="restore",
            figure=f"{store_kind}: open_budget() to first health reply",
            value=median(in_process),
            unit="s",
            at_most=TARGET_S,
            samples=tuple(in_process),
            note=(
                f"median of {len(in_process)} rounds, in process; {state}. From entering "
                "open_budget() to the reply of the first health() (which is checked: "
                f"{COSTS:,} dispatches). Includes connecting, the table checks, the empty "
                "spill file, store.load() (the share row, the journal tail after it: "
                "empty, nudges, max seq; no dispatch ids), Ledger.restore and starting "
                f"the actor. store.load() alone took {load_s:.2f} s."
            ),
        ),
        Row(
            scenario="restore",
            figure=f"{store_kind}: `serve` spawn to ready line",
            value=median(served),
            unit="s",
            at_most=TARGET_S,
            samples=tuple(served),
            note=(
                f"median of {len(served)} rounds: subprocess.Popen of `python -m "
                "budget_actor serve --port 0` until its ready line (ws://...) is read; "
                "includes starting the interpreter and importing the package."
            ),
        ),
    ]
    if store_kind == "sqlite":
        empty = [spawn_to_ready(f"sqlite:///{tmp / f'empty-{i}.db'}") for i in range(EMPTY_ROUNDS)]
        rows.append(
            Row(
                scenario="restore",
                figure="sqlite: `serve` spawn to ready line, empty database",
                value=median(empty),
                unit="s",
                samples=tuple(empty),
                note=(
                    f"median of {EMPTY_ROUNDS} rounds on a new SQLite file: the share of "
                    "the line above that is interpreter start, imports and set-up, not restore."
                ),
            )
        )
    return rows


def restore() -> list[Row]:
    """Start to ready with 100,000 journaled costs and the last patch 10 cycles back."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        rows.extend(_measure_store("sqlite", f"sqlite:///{Path(tmp, 'restore.db')}", Path(tmp)))
        try:
            with pg_schema() as url:
                rows.extend(_measure_store("postgresql", url, Path(tmp)))
        except psycopg.OperationalError as exc:
            rows.append(pg_skipped("restore", exc))
    return rows
