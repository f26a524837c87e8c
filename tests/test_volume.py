"""A large day: restore reads a few rows, not the day's journal, and dedupe
still holds for every id in it. On both stores."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from budget_actor import open_budget, open_store
from budget_actor.core.config import make_config
from budget_actor.core.cost import Cost
from budget_actor.core.records import JournalEntry
from budget_actor.stores.store import Store

from ._helpers import WallClock

ROWS = 200_000
BATCH = 20_000
USD = Decimal("0.00001")
NOW = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)
DAY = "2026-12-02"


class _Counted:
    """A DB-API cursor that counts the rows it hands to Python."""

    def __init__(self, cursor: Any, fetched: list[int]) -> None:
        self._cursor = cursor
        self._fetched = fetched

    def execute(self, *args: Any) -> _Counted:
        self._cursor.execute(*args)
        return self

    def fetchone(self) -> Any:
        row = self._cursor.fetchone()
        self._fetched[0] += row is not None
        return row

    def fetchall(self) -> list[Any]:
        found = list(self._cursor.fetchall())
        self._fetched[0] += len(found)
        return found

    def fetchmany(self, size: int) -> list[Any]:
        found = list(self._cursor.fetchmany(size))
        self._fetched[0] += len(found)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Connection:
    def __init__(self, conn: Any, fetched: list[int]) -> None:
        self._conn = conn
        self._fetched = fetched

    def cursor(self) -> _Counted:
        return _Counted(self._conn.cursor(), self._fetched)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _counting(store: Store) -> list[int]:
    """Make ``store`` count every row its queries return to Python."""
    fetched = [0]
    connect = store._connect

    def counted() -> Any:
        return _Connection(connect(), fetched)

    store._connect = counted  # type: ignore[method-assign]
    return fetched


@pytest.fixture
def big_day(database_url: str) -> Iterator[str]:
    """ROWS costs journaled today through the store's bulk path."""
    store = open_store(database_url, "bulk")
    store.open()
    try:
        for start in range(1, ROWS + 1, BATCH):
            entries = [
                JournalEntry(seq=seq, day=DAY, at=NOW, cost=Cost(f"big-{seq:07d}", USD))
                for seq in range(start, start + BATCH)
            ]
            store.write(entries, [], [], NOW)
    finally:
        store.close()
    yield database_url


@pytest.mark.slow
def test_restore_reads_the_share_not_the_journal(big_day: str) -> None:
    store = open_store(big_day, "bulk")
    store.open()
    fetched = _counting(store)
    try:
        restored = store.load(DAY)
    finally:
        store.close()
    assert restored.patch is not None and restored.entries == ()
    assert (restored.patch.daily_spend, restored.patch.dispatches) == (USD * ROWS, ROWS)
    assert restored.max_seq == ROWS
    assert fetched[0] < 20, f"restore read {fetched[0]} rows"


@pytest.mark.slow
async def test_a_restored_large_day_dedupes_every_id_without_loading_them(
    big_day: str,
) -> None:
    clock = WallClock(NOW)
    config = make_config(daily_cap="1000")
    async with open_budget(config, database=big_day, clock=clock, instance="bulk") as budget:
        health = await budget.health()
        assert (health.dispatches, health.daily_spend) == (ROWS, USD * ROWS)
        for seq in (1, ROWS // 2, ROWS):
            again = await budget.record(f"big-{seq:07d}", USD)
            assert (again.duplicate, again.seq) == (True, seq)
        fresh = await budget.record("fresh", "1")
        # (The resends were counted here until the store refused them: they
        # used up numbers, which is all they left behind.)
        assert not fresh.duplicate and fresh.seq > ROWS
        health = await budget.health()
        assert (health.dispatches, health.daily_spend) == (ROWS + 1, USD * ROWS + 1)
        assert not (await budget.admit("big-0000007", "0.1")).allowed
