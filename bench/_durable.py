"""``durable``: acknowledged-when-durable costs/s through ``Budget.record`` from
256 tasks, on SQLite and PostgreSQL; ``naive``: the same load with one INSERT
and commit per cost, as the baseline that group commit is measured against."""

from __future__ import annotations

import gc
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import trio

import budget_actor
from budget_actor.core.records import WriteResult, iso_utc
from budget_actor.stores.open import open_store
from budget_actor.stores.store import Store

from ._support import Load, closed_loop, pg_schema, pg_skipped
from .rows import Row, median, quantile

SENDERS = 256
# Far below any threshold: 8.00 (80% of the default cap) needs 8,000,000 costs.
USD = Decimal("0.000001")

# record() runs at ~10,000-12,000 costs/s here, so a 4 s round is ~45,000 calls
# and the scenario (2 stores x (warm-up + 3 rounds)) ~30 s.
DURABLE_ROUNDS = 3
DURABLE_ROUND_S = 4.0
DURABLE_WARMUP_S = 1.0
DURABLE_P99_MS = 50.0
# Durable ingest against what the store itself takes in bulk (issue 12).
DURABLE_TARGET_RATIO = 0.4

# The store's raw bulk-insert rate, measured in the same run: BULK_ROWS rows
# into the service's own budget_journal (same indexes), BULK_BATCH per
# transaction (the persister's largest group commit), rows prepared before
# the clock starts. SQLite: executemany of tuples; PostgreSQL: COPY of text.
BULK_ROWS = 200_000
BULK_BATCH = 5_000
# The same in transactions of SENDERS rows: the largest group commit that
# SENDERS callers each awaiting their ack can make, so the most that durable
# ingest can reach with that many in flight (each commit's fixed cost, the
# fsync above all, is paid every SENDERS costs instead of every 5,000).
SMALL_ROWS = 50_000

# One commit per cost: ~1,000-2,000/s, so 1.5 s rounds hold 1,500-3,000 calls.
NAIVE_ROUNDS = 3
NAIVE_ROUND_S = 1.5
NAIVE_WARMUP_S = 0.3
# When `naive` runs without `durable` before it in the same run, it measures
# record() itself, in one short round per store, for the ratio.
NAIVE_OWN_DURABLE_S = 3.0

# record_many(): BATCH_TASKS tasks each awaiting a batch of BATCH_ITEMS costs
# (ids ascending within a batch), so 800 costs are in flight and the
# persister's group commits hold hundreds. 16 tasks gave ~5% more costs/s
# and half again the latency (p99 38-56 ms against 28-36 ms).
BATCH_TASKS = 8
BATCH_ITEMS = 100
BATCH_ROUNDS = 3
BATCH_ROUND_S = 3.0
# record() against a store that writes nothing: the Python path's own
# ceiling (validation, mailbox, ledger, persister bookkeeping, the worker
# thread hop, the ack, trio's task switches), one round.
CEILING_ROUND_S = 3.0

STORES = ("sqlite", "postgresql")


@dataclass
class StoreRounds:
    loads: list[Load]
    commits: list[int]

    @property
    def rates(self) -> list[float]:
        return [load.rate for load in self.loads]

    def latencies_ms(self) -> list[float]:
        return sorted(x * 1000 for load in self.loads for x in load.latencies)


# Medians of the last `durable` run in this process, for `naive`'s ratio.
_durable_rates: dict[str, float] = {}


def _counting(store: Store) -> list[int]:
    """Count the store's write transactions (one per group commit)."""
    count = [0]
    write = store.write

    def counted(*args: Any) -> WriteResult:
        count[0] += 1
        return write(*args)

    setattr(store, "write", counted)  # noqa: B010 - an instance attribute, on purpose
    return count


Call = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class _Load:
    """A closed-loop load on one open_budget(): ``senders`` tasks each
    awaiting ``make(budget)(unique_id)`` back to back, every call worth
    ``costs`` costs; a warm-up, then ``rounds`` measured rounds."""

    make: Callable[[budget_actor.Budget], Call]
    senders: int
    costs: int
    rounds: int
    round_s: float
    warmup_s: float
    prefix: str
    # Replace the store's write with a no-op once the service has restored.
    write_nothing: bool = False


async def _rounds(url: str, spill: Path, load_of: _Load) -> StoreRounds:
    store = open_store(url)
    commits = _counting(store)
    result = StoreRounds([], [])
    async with budget_actor.open_budget(database=store, spill=spill) as budget:
        if load_of.write_nothing:
            setattr(store, "write", _write_nothing)  # noqa: B010 - after restore, on purpose
        call = load_of.make(budget)
        if load_of.warmup_s > 0:
            await closed_loop(call, load_of.senders, load_of.warmup_s, f"{load_of.prefix}w")
        for round_no in range(load_of.rounds):
            gc.collect()
            before = commits[0]
            load = await closed_loop(
                call, load_of.senders, load_of.round_s, f"{load_of.prefix}{round_no}"
            )
            result.loads.append(load)
            result.commits.append(commits[0] - before)
        health = await budget.health()
    expected = sum(load.calls for load in result.loads) * load_of.costs
    if health.dispatches < expected:
        raise RuntimeError(f"{health.dispatches} dispatches counted, {expected} acknowledged")
    return result


def _write_nothing(*args: Any) -> WriteResult:
    return WriteResult()


def _measure(store_kind: str, tmp: Path, load: _Load) -> StoreRounds:
    spill = tmp / f"{store_kind}-{load.prefix}.spill"
    if store_kind == "sqlite":
        return trio.run(_rounds, f"sqlite:///{tmp / f'{load.prefix}.db'}", spill, load)
    with pg_schema() as url:
        return trio.run(_rounds, url, spill, load)


def _record(budget: budget_actor.Budget) -> Call:
    async def record(dispatch_id: str) -> None:
        receipt = await budget.record(dispatch_id, USD)
        if receipt.duplicate or receipt.seq <= 0:
            raise RuntimeError(f"unexpected receipt {receipt}")

    return record


def _record_many(budget: budget_actor.Budget) -> Call:
    async def record_many(batch_id: str) -> None:
        costs = [{"dispatch_id": f"{batch_id}-{k:03d}", "usd": USD} for k in range(BATCH_ITEMS)]
        receipts = await budget.record_many(costs)
        if any(r.duplicate for r in receipts):
            raise RuntimeError("unexpected duplicate")

    return record_many


def _measure_record(
    store_kind: str, tmp: Path, rounds: int, round_s: float, warmup_s: float
) -> StoreRounds:
    load = _Load(_record, SENDERS, 1, rounds, round_s, warmup_s, "r")
    return _measure(store_kind, tmp, load)


def _measure_batches(store_kind: str, tmp: Path) -> StoreRounds:
    """BATCH_ROUNDS rounds of BATCH_TASKS tasks each awaiting
    ``record_many`` of BATCH_ITEMS costs back to back; a round's calls are
    batches."""
    load = _Load(
        _record_many,
        BATCH_TASKS,
        BATCH_ITEMS,
        BATCH_ROUNDS,
        BATCH_ROUND_S,
        DURABLE_WARMUP_S,
        "m",
    )
    return _measure(store_kind, tmp, load)


def _measure_ceiling(store_kind: str, tmp: Path) -> float:
    """record() from SENDERS tasks against the store with its write replaced
    by one that does nothing (still called in the worker thread, as every
    write is): costs/s of one round."""
    load = _Load(_record, SENDERS, 1, 1, CEILING_ROUND_S, DURABLE_WARMUP_S, "c", True)
    return _measure(store_kind, tmp, load).rates[0]


def _latency_rows(
    scenario: str, store_kind: str, data: StoreRounds, p99_target: float | None
) -> list[Row]:
    ordered = data.latencies_ms()
    per_round = [sorted(x * 1000 for x in load.latencies) for load in data.loads]
    calls = f"{len(ordered):,} calls in {len(data.loads)} rounds"
    return [
        Row(
            scenario=scenario,
            figure=f"{store_kind}: ack latency p50",
            value=quantile(ordered, 0.5),
            unit="ms",
            samples=tuple(quantile(r, 0.5) for r in per_round),
            note=f"time around each call, over all {calls} pooled; samples per round.",
        ),
        Row(
            scenario=scenario,
            figure=f"{store_kind}: ack latency p99",
            value=quantile(ordered, 0.99),
            unit="ms",
            at_most=p99_target,
            samples=tuple(quantile(r, 0.99) for r in per_round),
            note=f"as p50; max {ordered[-1]:.1f} ms.",
        ),
    ]


_COLUMNS = "seq, day, dispatch_id, usd, recorded_at, model, agent, input_tokens, output_tokens"


def _bulk_id(seq: int, spread: bool) -> str:
    """A bulk row's dispatch id: ``bulk-<seq>`` (each new id sorts after the
    last, so every index grows at its end: the best case), or with
    ``spread`` the shape of closed_loop's ids, ``r-<task>-<i>``, seq k coming
    from task k mod SENDERS, as record() from SENDERS tasks journals them
    (each transaction inserts at SENDERS places in every index)."""
    if spread:
        return f"r-{seq % SENDERS:03d}-{seq // SENDERS:06d}"
    return f"bulk-{seq:07d}"


def _bulk_rows(day: str, now: datetime, count: int, spread: bool) -> list[tuple[Any, ...]]:
    usd = str(USD)
    return [
        (seq, day, _bulk_id(seq, spread), usd, now, None, None, None, None)
        for seq in range(1, count + 1)
    ]


def _bulk_sqlite(tmp: Path, count: int, per_transaction: int, spread: bool) -> float:
    path = tmp / f"bulk-{per_transaction}-{spread}.db"
    store = open_store(f"sqlite:///{path}")
    store.open()  # the service's tables and indexes
    store.close()
    now = datetime.now(UTC)
    day = now.date().isoformat()
    rows = [(*r[:4], iso_utc(now), *r[5:]) for r in _bulk_rows(day, now, count, spread)]
    chunks = [rows[i : i + per_transaction] for i in range(0, len(rows), per_transaction)]
    insert = f"INSERT INTO budget_journal ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        gc.collect()
        start = time.perf_counter()
        for chunk in chunks:
            conn.execute("BEGIN")
            conn.executemany(insert, chunk)
            conn.execute("COMMIT")
        return count / (time.perf_counter() - start)
    finally:
        conn.close()


def _bulk_postgres(count: int, per_transaction: int, spread: bool) -> float:
    with pg_schema() as url:
        store = open_store(url)
        store.open()
        store.close()
        now = datetime.now(UTC)
        stamp = now.isoformat()
        chunks = []
        rows = _bulk_rows(now.date().isoformat(), now, count, spread)
        for i in range(0, len(rows), per_transaction):
            chunks.append(
                "".join(
                    f"{seq}\t{day}\t{dispatch_id}\t{usd}\t{stamp}\t\\N\t\\N\t\\N\t\\N\n"
                    for seq, day, dispatch_id, usd, *_ in rows[i : i + per_transaction]
                ).encode()
            )
        with psycopg.connect(url) as conn:
            gc.collect()
            start = time.perf_counter()
            for chunk in chunks:
                with (
                    conn.cursor() as cur,
                    cur.copy(f"COPY budget_journal ({_COLUMNS}) FROM STDIN") as copy,
                ):
                    copy.write(chunk)
                conn.commit()
            return count / (time.perf_counter() - start)


def _bulk(
    store_kind: str, tmp: Path, count: int, per_transaction: int, *, spread: bool = False
) -> float:
    if store_kind == "sqlite":
        return _bulk_sqlite(tmp, count, per_transaction, spread)
    return _bulk_postgres(count, per_transaction, spread)


def _bulk_rows_of(store_kind: str, bulk: float, small: float, spread: float) -> list[Row]:
    how = (
        "sqlite3 executemany of prepared tuples, WAL, synchronous=FULL"
        if store_kind == "sqlite"
        else "COPY FROM STDIN of prepared text, default synchronous_commit=on"
    )
    return [
        Row(
            scenario="durable",
            figure=f"{store_kind}: raw bulk insert into the journal (the limit)",
            value=bulk,
            unit="rows/s",
            note=(
                f"{BULK_ROWS:,} rows into a fresh budget_journal with the service's indexes, "
                f"{BULK_BATCH:,} per transaction ({how}); the rows are built before the clock "
                "starts, and nothing else runs: what the store takes at most, measured in "
                "this run. Their ids ascend, so every index grows at its end (the best case)."
            ),
        ),
        Row(
            scenario="durable",
            figure=f"{store_kind}: raw insert, {SENDERS} rows per transaction",
            value=small,
            unit="rows/s",
            note=(
                f"as the line above, {SMALL_ROWS:,} rows in transactions of {SENDERS}: the "
                f"largest group commit that {SENDERS} callers awaiting their acks can form, so "
                "the most durable ingest can reach with that many in flight, with no CPU spent "
                "on anything but the store."
            ),
        ),
        Row(
            scenario="durable",
            figure=f"{store_kind}: raw insert of record()'s ids, {SENDERS} per transaction",
            value=spread,
            unit="rows/s",
            note=(
                f"as the line above, but with ids shaped as the record() rounds write them "
                f"(r-<task>-<i>, {SENDERS} tasks taking turns): each transaction inserts at "
                f"{SENDERS} places in each of the journal's three (day, dispatch_id) keys "
                "instead of at their ends. The store's own limit for record()'s rows."
            ),
        ),
    ]


def _durable_rows(store_kind: str, data: StoreRounds) -> list[Row]:
    """The record() figure and its latencies."""
    batches = [load.calls / max(1, n) for load, n in zip(data.loads, data.commits, strict=True)]
    where = (
        "temporary file, WAL, synchronous=FULL"
        if store_kind == "sqlite"
        else "fresh schema, default synchronous_commit=on"
    )
    return [
        Row(
            scenario="durable",
            figure=f"{store_kind}: record() from {SENDERS} tasks",
            value=median(data.rates),
            unit="costs/s",
            samples=tuple(data.rates),
            note=(
                f"median of {DURABLE_ROUNDS} rounds of {DURABLE_ROUND_S:.0f} s (after a "
                f"{DURABLE_WARMUP_S:.0f} s warm-up) in one open_budget() on {store_kind} "
                f"({where}); {SENDERS} tasks each await budget.record(id, usd) back to "
                "back, so a cost counts once its receipt is durable; the clock stops "
                "when the last call in flight returns. Per round: "
                f"{', '.join(f'{load.calls:,}' for load in data.loads)} costs in "
                f"{', '.join(str(n) for n in data.commits)} store transactions "
                f"(mean group commit {', '.join(f'{b:.0f}' for b in batches)} costs)."
            ),
            extra={"calls": [load.calls for load in data.loads], "commits": data.commits},
        ),
        *_latency_rows("durable", store_kind, data, DURABLE_P99_MS),
    ]


def _batch_rows(store_kind: str, data: StoreRounds, bulk: float) -> list[Row]:
    """The record_many() figures."""
    rates = [load.calls * BATCH_ITEMS / load.seconds for load in data.loads]
    rate = median(rates)
    ordered = data.latencies_ms()
    per_batch = [
        load.calls * BATCH_ITEMS / max(1, n)
        for load, n in zip(data.loads, data.commits, strict=True)
    ]
    return [
        Row(
            scenario="durable",
            figure=f"{store_kind}: record_many() of {BATCH_ITEMS} from {BATCH_TASKS} tasks",
            value=rate,
            unit="costs/s",
            samples=tuple(rates),
            note=(
                f"median of {BATCH_ROUNDS} rounds of {BATCH_ROUND_S:.0f} s (after a warm-up) "
                f"in one open_budget(); {BATCH_TASKS} tasks each await "
                f"budget.record_many() of {BATCH_ITEMS} costs back to back (ids ascending "
                "within a batch, and from batch to batch within a task), so a cost counts "
                "once its batch is durable. Mean group "
                f"commit {', '.join(f'{b:,.0f}' for b in per_batch)} costs."
            ),
        ),
        Row(
            scenario="durable",
            figure=f"{store_kind}: record_many() latency p99",
            value=quantile(ordered, 0.99),
            unit="ms",
            at_most=DURABLE_P99_MS,
            samples=tuple(
                quantile(sorted(x * 1000 for x in load.latencies), 0.99) for load in data.loads
            ),
            note=f"time around each call (a batch), {len(ordered):,} calls pooled.",
        ),
        Row(
            scenario="durable",
            figure=f"{store_kind}: ratio record_many()/bulk insert",
            value=rate / bulk,
            unit="",
            at_least=DURABLE_TARGET_RATIO,
            note=f"record_many() costs/s ({rate:,.0f}) / raw bulk insert rows/s ({bulk:,.0f}).",
        ),
    ]


def durable() -> list[Row]:
    """Durable costs/s: record() from 256 tasks and record_many() of 100, beside the store's limits.

    On SQLite and PostgreSQL, with the store's raw insert rates and the
    service's own ceiling (a store that writes nothing) in the same run.
    """
    rows: list[Row] = []
    _durable_rates.clear()
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        for store_kind in STORES:
            try:
                data = _measure_record(
                    store_kind, Path(tmp), DURABLE_ROUNDS, DURABLE_ROUND_S, DURABLE_WARMUP_S
                )
                batches = _measure_batches(store_kind, Path(tmp))
                ceiling = _measure_ceiling(store_kind, Path(tmp))
                bulk = _bulk(store_kind, Path(tmp), BULK_ROWS, BULK_BATCH)
                small = _bulk(store_kind, Path(tmp), SMALL_ROWS, SENDERS)
                spread = _bulk(store_kind, Path(tmp), SMALL_ROWS, SENDERS, spread=True)
            except psycopg.OperationalError as exc:
                rows.append(pg_skipped("durable", exc))
                continue
            rate = median(data.rates)
            _durable_rates[store_kind] = rate
            rows.extend(_durable_rows(store_kind, data))
            rows.extend(_bulk_rows_of(store_kind, bulk, small, spread))
            rows.append(
                Row(
                    scenario="durable",
                    figure=f"{store_kind}: ratio durable/bulk insert",
                    value=rate / bulk,
                    unit="",
                    at_least=DURABLE_TARGET_RATIO,
                    note=f"record() costs/s ({rate:,.0f}) / raw bulk insert rows/s ({bulk:,.0f}).",
                )
            )
            rows.append(
                Row(
                    scenario="durable",
                    figure=f"{store_kind}: ratio durable/insert of record()'s ids",
                    value=rate / spread,
                    unit="",
                    note=(
                        f"record() costs/s ({rate:,.0f}) / raw insert of the same kind of "
                        f"ids in transactions of {SENDERS} ({spread:,.0f}): how close the "
                        "service comes to what the store takes of these very rows."
                    ),
                )
            )
            rows.append(
                Row(
                    scenario="durable",
                    figure=f"{store_kind}: record() with a store that writes nothing",
                    value=ceiling,
                    unit="costs/s",
                    note=(
                        f"one {CEILING_ROUND_S:.0f} s round of the record() load with the "
                        "store's write replaced by a no-op (still run in the worker thread): "
                        "the service's own ceiling for one cost per call, whatever the store."
                    ),
                )
            )
            rows.append(
                Row(
                    scenario="durable",
                    figure=f"{store_kind}: ratio that ceiling/bulk insert",
                    value=ceiling / bulk,
                    unit="",
                    note=(
                        "the highest durable/bulk ratio record() could reach here with an "
                        "infinitely fast store."
                    ),
                )
            )
            rows.extend(_batch_rows(store_kind, batches, bulk))
    return rows


# -- naive ---------------------------------------------------------------------------

_INSERT = (
    "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at, model, agent,"
    " input_tokens, output_tokens) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"
    " ON CONFLICT DO NOTHING"
)


async def _naive_rounds(
    connection: Any, store_kind: str, rounds: int, round_s: float, warmup_s: float
) -> StoreRounds:
    """256 tasks, each cost one INSERT + COMMIT in a worker thread, one at a time."""
    statement = _INSERT.format(p="?" if store_kind == "sqlite" else "%s")
    stamp: Callable[[datetime], Any] = iso_utc if store_kind == "sqlite" else (lambda at: at)
    limiter = trio.CapacityLimiter(1)
    seq = 0

    def insert_and_commit(params: tuple[Any, ...]) -> None:
        connection.execute(statement, params)
        connection.commit()

    async def insert(dispatch_id: str) -> None:
        nonlocal seq
        seq += 1
        now = datetime.now(UTC)
        day = now.date().isoformat()
        params = (seq, day, dispatch_id, str(USD), stamp(now), None, None, None, None)
        await trio.to_thread.run_sync(insert_and_commit, params, limiter=limiter)

    result = StoreRounds([], [])
    if warmup_s > 0:
        await closed_loop(insert, SENDERS, warmup_s, "warm")
    for round_no in range(rounds):
        gc.collect()
        load = await closed_loop(insert, SENDERS, round_s, f"r{round_no}")
        result.loads.append(load)
        result.commits.append(load.calls)
    return result


def _measure_naive(store_kind: str, tmp: Path) -> StoreRounds:
    args = (store_kind, NAIVE_ROUNDS, NAIVE_ROUND_S, NAIVE_WARMUP_S)
    if store_kind == "sqlite":
        path = tmp / "naive.db"
        store = open_store(f"sqlite:///{path}")
        store.open()  # the same table and indexes as the service's
        store.close()
        conn = sqlite3.connect(path, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            return trio.run(_naive_rounds, conn, *args)
        finally:
            conn.close()
    with pg_schema() as url:
        store = open_store(url)
        store.open()
        store.close()
        with psycopg.connect(url) as pg:
            return trio.run(_naive_rounds, pg, *args)


def naive() -> list[Row]:
    """The durable workload with one INSERT+COMMIT per cost: baseline and durable/naive ratio."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        for store_kind in STORES:
            try:
                data = _measure_naive(store_kind, Path(tmp))
                durable_rate = _durable_rates.get(store_kind)
                source = "the median of this run's `durable` rounds"
                if durable_rate is None:
                    print(
                        f"  naive: no `durable` figure for {store_kind} in this run;"
                        f" measuring record() for {NAIVE_OWN_DURABLE_S:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    own = _measure_record(store_kind, Path(tmp), 1, NAIVE_OWN_DURABLE_S, 0.5)
                    durable_rate = own.rates[0]
                    source = (
                        f"one {NAIVE_OWN_DURABLE_S:.0f} s round of record() measured by `naive` "
                        "itself (`durable` did not run first)"
                    )
            except psycopg.OperationalError as exc:
                rows.append(pg_skipped("naive", exc))
                continue
            rate = median(data.rates)
            settings = (
                "sqlite3, WAL, synchronous=FULL"
                if store_kind == "sqlite"
                else "psycopg, default synchronous_commit=on"
            )
            rows.append(
                Row(
                    scenario="naive",
                    figure=f"{store_kind}: one INSERT+COMMIT per cost, {SENDERS} tasks",
                    value=rate,
                    unit="costs/s",
                    samples=tuple(data.rates),
                    note=(
                        f"median of {NAIVE_ROUNDS} rounds of {NAIVE_ROUND_S} s after a "
                        f"{NAIVE_WARMUP_S} s warm-up; per round "
                        f"{', '.join(f'{load.calls:,}' for load in data.loads)} costs. "
                        f"{SENDERS} trio tasks each await trio.to_thread.run_sync("
                        "insert_and_commit) on one connection under CapacityLimiter(1) "
                        f"({settings}), into the service's own budget_journal table "
                        "(same indexes, same INSERT ... ON CONFLICT DO NOTHING)."
                    ),
                )
            )
            rows.extend(_latency_rows("naive", store_kind, data, None))
            rows.append(
                Row(
                    scenario="naive",
                    figure=f"{store_kind}: ratio durable/naive",
                    value=durable_rate / rate,
                    unit="",
                    note=f"record() costs/s ({durable_rate:,.0f}, {source}) / naive costs/s.",
                )
            )
    return rows
