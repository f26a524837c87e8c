"""The database goes away and comes back: the service keeps counting, health
says degraded, and everything drains once the store is back."""

from __future__ import annotations

from decimal import Decimal

import trio

from budget_actor import make_config, open_budget

from ._helpers import eventually, rows
from ._proxy import CuttableProxy, target_of

CONFIG = make_config(daily_cap="10.00", persist_every=10)


async def test_outage_degrades_keeps_counting_and_drains_exactly_once(pg_url: str) -> None:
    proxy = CuttableProxy(*target_of(pg_url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with open_budget(CONFIG, database=proxy.url_for(pg_url)) as budget:
            await budget.record("before", "1")
            proxy.cut()
            acked: list[int] = []

            async def send(i: int) -> None:
                receipt = await budget.record(f"during-{i}", "0.05")
                acked.append(receipt.seq)

            async with trio.open_nursery() as senders:
                for i in range(20):
                    senders.start_soon(send, i)
                for _ in range(10):
                    await budget.cycle()  # a patch falls due during the outage

                async def degraded() -> bool:
                    h = await budget.health()
                    return h.status == "degraded" and not h.store_ok and h.pending == 20

                await eventually(degraded, timeout=30)
                health = await budget.health()
                # Counting never stopped; nothing is acknowledged while the store is away.
                assert health.daily_spend == Decimal("2.00") and health.dispatches == 21
                assert acked == []
                proxy.restore()
            assert sorted(acked) == list(range(2, 22))

            async def recovered() -> bool:
                h = await budget.health()
                return h.status == "ok" and h.store_ok and h.pending == 0

            await eventually(recovered, timeout=30)
        nursery.cancel_scope.cancel()
    journal = rows(pg_url, "SELECT dispatch_id, usd FROM budget_journal ORDER BY seq")
    assert len(journal) == 21 and len({d for d, _ in journal}) == 21
    assert sum(Decimal(str(u)) for _, u in journal) == Decimal("2.00")
    patch = rows(pg_url, "SELECT body FROM quilt_patches WHERE type = 'budget'")
    assert [p[0]["daily_spend"] for p in patch] == ["2.00"]
    assert patch[0][0]["cycle_count"] == 10
