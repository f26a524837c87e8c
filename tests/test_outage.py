"""The database goes away and comes back: the service keeps counting, health
says degraded, and everything drains, in order and exactly once, when the
store is back."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import trio

from budget_actor import Budget, make_config, open_budget
from budget_actor.core.cost import Cost
from budget_actor.core.records import JournalEntry
from budget_actor.runtime.service import default_spill_path
from budget_actor.stores.open import open_store
from budget_actor.stores.spill import SpillFile, claim, slot

from ._helpers import eventually, rows
from ._proxy import CuttableProxy, target_of

CONFIG = make_config(daily_cap="10.00", persist_every=10)


async def _degraded(budget: Budget, pending: int) -> None:
    async def check() -> bool:
        h = await budget.health()
        return h.status == "degraded" and not h.store_ok and h.pending == pending

    await eventually(check, timeout=30)


async def _recovered(budget: Budget) -> None:
    async def check() -> bool:
        h = await budget.health()
        return h.status == "ok" and h.store_ok and h.pending == 0

    await eventually(check, timeout=30)


def _check_store(pg_url: str, costs: int, total: str, cycles: int) -> None:
    journal = rows(pg_url, "SELECT seq, dispatch_id, usd FROM budget_journal ORDER BY seq")
    assert [s for s, _, _ in journal] == list(range(1, costs + 1))  # in order, no gaps
    assert len({d for _, d, _ in journal}) == costs
    assert sum(Decimal(str(u)) for _, _, u in journal) == Decimal(total)
    patch = rows(pg_url, "SELECT body FROM quilt_patches WHERE type = 'budget'")
    assert [p[0]["daily_spend"] for p in patch] == [total]
    assert patch[0][0]["cycle_count"] == cycles


async def test_outage_spills_acks_and_drains_exactly_once(pg_url: str, tmp_path: Path) -> None:
    spill = tmp_path / "outage.spill"
    proxy = CuttableProxy(*target_of(pg_url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with open_budget(CONFIG, database=proxy.url_for(pg_url), spill=spill) as budget:
            await budget.record("before", "1")
            proxy.cut()
            # Acknowledged during the outage: durable in the spill file.
            receipts = [await budget.record(f"during-{i}", "0.05") for i in range(20)]
            assert [r.seq for r in receipts] == list(range(2, 22))
            for _ in range(10):
                await budget.cycle()  # a patch falls due during the outage
            await _degraded(budget, pending=20)
            health = await budget.health()
            assert health.daily_spend == Decimal("2.00") and health.dispatches == 21
            assert len(spill.read_bytes().splitlines()) == 20
            assert rows(pg_url, "SELECT count(*) FROM budget_journal") == [(1,)]
            proxy.restore()
            await _recovered(budget)
            assert spill.read_bytes() == b""
        nursery.cancel_scope.cancel()
    _check_store(pg_url, 21, "2.00", 10)


async def test_outage_without_spill_file_holds_acks_until_the_store_is_back(
    pg_url: str,
) -> None:
    proxy = CuttableProxy(*target_of(pg_url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with open_budget(CONFIG, database=proxy.url_for(pg_url), spill=False) as budget:
            await budget.record("before", "1")
            proxy.cut()
            acked: list[int] = []

            async def send(i: int) -> None:
                acked.append((await budget.record(f"during-{i}", "0.05")).seq)

            async with trio.open_nursery() as senders:
                for i in range(20):
                    senders.start_soon(send, i)
                for _ in range(10):
                    await budget.cycle()
                await _degraded(budget, pending=20)
                health = await budget.health()
                # Counting never stopped; nothing was acknowledged without the store.
                assert health.daily_spend == Decimal("2.00") and health.dispatches == 21
                assert acked == []
                proxy.restore()
            assert sorted(acked) == list(range(2, 22))
            await _recovered(budget)
        nursery.cancel_scope.cancel()
    _check_store(pg_url, 21, "2.00", 10)


async def test_spilled_costs_survive_a_crash_and_come_back_on_restart(
    pg_url: str, tmp_path: Path
) -> None:
    """A stand-in for kill -9 during an outage: the spill file from a run that
    never reached the store is drained by the next start, before restore."""
    spill = tmp_path / "crash.spill"
    proxy = CuttableProxy(*target_of(pg_url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        with trio.CancelScope() as crash:
            async with open_budget(CONFIG, database=proxy.url_for(pg_url), spill=spill) as budget:
                await budget.record("a", "1")
                proxy.cut()
                await budget.record("b", "2.5")
                await budget.record("c", "0.25")
                crash.cancel()  # the final flush cannot reach the store either
        assert len(spill.read_bytes().splitlines()) == 2
        proxy.restore()
        async with open_budget(CONFIG, database=proxy.url_for(pg_url), spill=spill) as budget:
            health = await budget.health()
            assert (health.daily_spend, health.dispatches, health.seq) == (Decimal("3.75"), 3, 3)
            assert (await budget.record("b", "2.5")).duplicate
        nursery.cancel_scope.cancel()
    assert spill.read_bytes() == b""
    journal = rows(pg_url, "SELECT dispatch_id FROM budget_journal ORDER BY seq")
    assert journal == [("a",), ("b",), ("c",)]


async def test_http_health_is_503_while_degraded(pg_url: str, tmp_path: Path) -> None:
    from budget_actor.net.server import serve

    async def get(port: int, path: str) -> tuple[int, bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    proxy = CuttableProxy(*target_of(pg_url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        url = proxy.url_for(pg_url)
        async with open_budget(CONFIG, database=url, spill=tmp_path / "h.spill") as budget:
            port = await nursery.start(serve, budget, "127.0.0.1", 0)
            assert (await get(port, "/health"))[0] == 200
            proxy.cut()
            await budget.record("x", "1")  # spilled
            await _degraded(budget, pending=1)
            status, body = await get(port, "/health")
            assert status == 503 and b'"status":"degraded"' in body
            status, metrics = await get(port, "/metrics")
            assert status == 200 and b"\nbudget_up 0.0\n" in metrics
            assert b"\nbudget_pending_costs 1.0\n" in metrics
            proxy.restore()
            await _recovered(budget)
            assert (await get(port, "/health"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_spilled_costs_of_an_earlier_day_rebuild_its_patch(
    sqlite_url: str, tmp_path: Path
) -> None:
    """An outage across midnight, then a stop before the store came back: the
    next start journals yesterday's spilled costs and rebuilds its patch."""
    from datetime import UTC, datetime

    from budget_actor import open_store
    from budget_actor.core.records import JournalEntry
    from budget_actor.stores.spill import SpillFile

    from ._helpers import WallClock

    day = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    clock = WallClock(day)
    spill_path = tmp_path / "midnight.spill"
    async with open_budget(CONFIG, database=sqlite_url, clock=clock, spill=spill_path) as budget:
        await budget.record("a", "1.25")
        for _ in range(10):
            await budget.cycle()  # yesterday's patch: 1.25
    # What the outage left behind: two more of yesterday's costs, spilled.
    spill = SpillFile(spill_path)
    spill.open()
    spill.append(
        [
            JournalEntry(seq=seq, day="2026-11-30", at=day, cost=Cost(d, Decimal(u)))
            for seq, d, u in [(2, "b", "0.50"), (3, "c", "0.25")]
        ]
    )
    clock.advance(3600)  # the next start is on the next day
    async with open_budget(CONFIG, database=sqlite_url, clock=clock, spill=spill_path) as budget:
        assert (await budget.health()).day == "2026-12-01"
    store = open_store(sqlite_url)
    store.open(create=False)
    try:
        body = store.get_patch("budget", "budget_2026-11-30")
    finally:
        store.close()
    assert body is not None
    assert (body["daily_spend"], body["dispatches"], body["seq"]) == ("2.00", 3, 3)
    assert body["cycle_count"] == 10


def test_live_processes_get_spill_files_of_their_own(tmp_path: Path) -> None:
    base = tmp_path / "budget-x.spill"
    first, none = claim(base)
    second, _ = claim(base)
    assert first.path == base and second.path != base and none == []
    second.release()
    first.release()


async def test_a_dead_instances_spill_file_is_drained_by_whoever_starts(
    pg_url: str, tmp_path: Path
) -> None:
    """An instance spilled acknowledged costs and never came back; the next
    instance to start on the same database and directory writes them, even
    though it takes another free slot as its own."""
    base = default_spill_path(open_store(pg_url))
    one, _ = claim(base)  # "one" and "two" are alive and hold slots 1 and 2
    two, _ = claim(base)
    dead = SpillFile(slot(base, 3))
    dead.open()
    dead.append([_spilled("lost-1", "0.5"), _spilled("lost-2", "0.25")])
    two.release()  # "two" stops: "three" takes slot 2, so slot 3 is an orphan
    async with open_budget(CONFIG, database=pg_url, instance="three", spill=True) as budget:
        await budget.health()
    one.release()
    assert rows(pg_url, "SELECT count(*), sum(usd) FROM budget_journal") == [(2, Decimal("0.75"))]
    assert dead.read() == []  # drained, and its entries are in the store once


def _spilled(dispatch_id: str, usd: str) -> JournalEntry:
    from datetime import UTC, datetime

    return JournalEntry(
        seq=1 if dispatch_id.endswith("1") else 2,
        day=datetime.now(UTC).date().isoformat(),
        at=datetime.now(UTC),
        cost=Cost(dispatch_id, Decimal(usd)),
    )


async def test_a_shared_instance_refuses_admit_while_its_costs_wait_in_the_spill_file(
    pg_url: str, tmp_path: Path
) -> None:
    """Costs acknowledged from the spill file are in no share yet: admitting
    against the store's figure would ignore them. Once drained, admit works."""
    proxy = CuttableProxy(*target_of(pg_url))
    config = make_config(daily_cap="10.00", sync_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        url = proxy.url_for(pg_url)
        async with open_budget(config, database=url, spill=tmp_path / "s.spill") as budget:
            assert (await budget.admit("early", "1")).allowed
            proxy.cut()
            await budget.record("spilled", "9")
            refused = await budget.admit("late", "0.5")
            assert not refused.allowed and "not all in the shared store" in (refused.reason or "")
            proxy.restore()
            await _recovered(budget)
            after = await budget.admit("late", "0.5")
            # 9 spent and 1 reserved of 10: the drained cost counts now.
            assert not after.allowed and after.remaining == 0
        nursery.cancel_scope.cancel()
