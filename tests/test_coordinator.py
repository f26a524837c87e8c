"""Instances sharing one PostgreSQL budget, in one process: the coordinator's
sync, cross-instance duplicates, the guarded alert and global admission,
through the in-process API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import trio

from budget_actor import Budget, make_config, open_budget
from budget_actor.core.views import AlertNotice

from ._helpers import eventually, rows

CONFIG = make_config(daily_cap="10.00", alert_at="0.8", sync_interval_s=0.05)


@asynccontextmanager
async def _two(pg_url: str) -> AsyncIterator[tuple[Budget, Budget]]:
    async with (
        open_budget(CONFIG, database=pg_url, instance="one", spill=False) as one,
        open_budget(CONFIG, database=pg_url, instance="two", spill=False) as two,
    ):
        yield one, two


async def _global(budget: Budget, spend: str) -> None:
    async def check() -> bool:
        return (await budget.health()).daily_spend == Decimal(spend)

    await eventually(check)


async def test_each_instance_sees_the_global_spend_and_its_own_share(pg_url: str) -> None:
    async with _two(pg_url) as (one, two):
        await one.record("a", "1.25")
        await two.record("b", "0.50")
        await two.record("c", "0.25")
        await _global(one, "2.00")
        await _global(two, "2.00")
        h1, h2 = await one.health(), await two.health()
        assert (h1.instance, h1.instance_spend, h1.instance_dispatches) == (
            "one",
            Decimal("1.25"),
            1,
        )
        assert (h2.instance_spend, h2.dispatches, h2.instances) == (Decimal("0.75"), 3, 2)
        assert h1.sync_age_s is not None and h1.sync_age_s >= 0


async def test_an_id_counted_on_another_instance_is_a_duplicate(pg_url: str) -> None:
    async with _two(pg_url) as (one, two):
        first = await one.record("same", "3")
        await _global(two, "3")  # known to "two" only through the store
        again = await two.record("same", "3")
        assert (again.duplicate, again.seq) == (True, first.seq)
        await _global(two, "3")
        assert (await two.health()).instance_spend == 0
        assert rows(pg_url, "SELECT count(*), sum(usd) FROM budget_journal") == [(1, Decimal(3))]


async def test_a_cross_instance_duplicate_is_found_even_when_both_race(pg_url: str) -> None:
    """Both instances count the same ids at once; the store keeps one of each
    and the loser takes its copies back out."""
    async with _two(pg_url) as (one, two):
        receipts: list[tuple[str, bool]] = []

        async def send(budget: Budget, name: str) -> None:
            for i in range(50):
                receipt = await budget.record(f"race-{i}", "0.01")
                receipts.append((name, receipt.duplicate))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, one, "one")
            nursery.start_soon(send, two, "two")
        assert sum(1 for _, duplicate in receipts if not duplicate) == 50
        await _global(one, "0.50")
        await _global(two, "0.50")
        h1, h2 = await one.health(), await two.health()
        assert h1.instance_spend + h2.instance_spend == Decimal("0.50")


async def test_one_nudge_row_and_one_push_per_instance(pg_url: str) -> None:
    async with _two(pg_url) as (one, two):
        seen: dict[str, list[AlertNotice]] = {"one": [], "two": []}

        async def watch(budget: Budget, name: str) -> None:
            async with budget.subscribe() as updates:
                async for update in updates:
                    if isinstance(update, AlertNotice):
                        seen[name].append(update)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, one, "one")
            nursery.start_soon(watch, two, "two")
            await trio.sleep(0.1)
            await one.record("a", "4")
            await two.record("b", "4")  # 8.00 of 10.00: 80%, on neither alone

            async def both() -> bool:
                return bool(seen["one"]) and bool(seen["two"])

            await eventually(both)
            await trio.sleep(0.3)  # room for a second push that must not come
            nursery.cancel_scope.cancel()
        assert [len(seen["one"]), len(seen["two"])] == [1, 1]
        assert rows(pg_url, "SELECT count(*) FROM quilt_patches WHERE type = 'sibling_nudge'") == [
            (1,)
        ]


async def test_admission_is_global(pg_url: str) -> None:
    async with _two(pg_url) as (one, two):
        await one.record("spent", "6")
        held = await one.admit("d1", "3")
        assert (held.allowed, held.remaining) == (True, Decimal("1.00"))
        refused = await two.admit("d2", "1.5")  # would fit on "two" alone
        assert not refused.allowed and refused.remaining == Decimal("1.00")

        async def reserved() -> bool:
            return (await two.health()).reserved == Decimal("3")

        await eventually(reserved)
        await two.record("d1", "2")  # settled on the other instance, at its real cost
        fits = await one.admit("d2", "1.5")
        assert (fits.allowed, fits.remaining) == (True, Decimal("0.50"))


async def test_metrics_show_the_share_under_an_escaped_instance_label(pg_url: str) -> None:
    from budget_actor.net.metrics import render

    weird = 'lab "7"\\x'
    async with open_budget(CONFIG, database=pg_url, instance=weird, spill=False) as budget:
        await budget.record("a", "0.5")
        text = render(await budget.health())
    assert 'budget_instance_spend_usd{day="' in text
    assert 'instance="lab \\"7\\"\\\\x"} 0.5' in text
    assert "budget_instances{" in text
