"""The actor and its children, in process, on real stores."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import trio

from budget_actor import (
    AlertNotice,
    Budget,
    Escalation,
    InvalidCost,
    RestartPolicy,
    ServiceStopped,
    Spend,
    make_config,
    open_budget,
)
from budget_actor.runtime.fanout import Published
from budget_actor.stores.sqlite import SqliteStore

from ._helpers import WallClock, eventually, rows

NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CONFIG = make_config(daily_cap="10.00", persist_every=10)


def _body(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)


def _patch(url: str, day: str) -> dict[str, Any] | None:
    found = rows(
        url,
        "SELECT body FROM quilt_patches WHERE type = 'budget' AND name = %s",
        (f"budget_{day}",),
    )
    return _body(found[0][0]) if found else None


def _nudges(url: str) -> list[str]:
    found = rows(url, "SELECT name FROM quilt_patches WHERE type = 'sibling_nudge' ORDER BY name")
    return [r[0] for r in found]


async def test_record_is_durable_and_patch_every_ten_cycles(database_url: str) -> None:
    async with open_budget(CONFIG, database=database_url) as budget:
        receipt = await budget.record("d1", "0.1")
        await budget.record("d2", Decimal("0.2"))
        assert (receipt.seq, receipt.duplicate) == (1, False)
        journal = rows(database_url, "SELECT dispatch_id, usd FROM budget_journal ORDER BY seq")
        assert [(d, Decimal(str(u))) for d, u in journal] == [
            ("d1", Decimal("0.1")),
            ("d2", Decimal("0.2")),
        ]
        day = (await budget.health()).day
        for _ in range(9):
            await budget.cycle()
        await budget.health()  # every cycle is handled
        await trio.sleep(0.2)
        assert _patch(database_url, day) is None
        await budget.cycle()

        async def written() -> bool:
            return (await budget.health()).last_persist_at is not None

        await eventually(written)
        patch = _patch(database_url, day)
        assert patch is not None
        if database_url.startswith("postgresql"):
            # The one instance's share, as the patch records it for `verify`.
            assert list(patch.pop("shares").values()) == [
                {"daily_spend": "0.3", "dispatches": 2, "seq": 2}
            ]
        assert patch == {
            "date": day,
            "daily_spend": "0.3",
            "daily_cap": "10.00",
            "cycle_count": 10,
            "dispatches": 2,
            "alerts_sent": [],
            "seq": 2,
        }


async def test_bad_costs_are_refused_and_change_nothing(sqlite_url: str) -> None:
    async with open_budget(CONFIG, database=sqlite_url) as budget:
        for usd in ["-0.01", "NaN", "abc", "1000.01", "1e400"]:
            with pytest.raises(InvalidCost, match="usd"):
                await budget.record("x", usd)
        with pytest.raises(InvalidCost):
            await budget.record("x", 0.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidCost, match="dispatch_id"):
            await budget.record("", "1")
        health = await budget.health()
        assert (health.daily_spend, health.seq) == (0, 0)


async def test_restart_restores_and_never_alerts_twice(database_url: str) -> None:
    async with open_budget(CONFIG, database=database_url) as budget:
        async with budget.subscribe() as updates:
            await budget.record("a", "7.5")
            await budget.record("b", "0.75")
            seen: list[Any] = []
            with trio.fail_after(5):
                async for update in updates:
                    seen.append(update)
                    if isinstance(update, AlertNotice):
                        break
        alert = seen[-1]
        assert alert == AlertNotice(
            to="AG Lu",
            day=alert.day,
            threshold=0.8,
            daily_spend=Decimal("8.25"),
            daily_cap=Decimal("10.00"),
        )
        await budget.record("c", "0.5")  # not persisted by a patch: journal only
    assert _nudges(database_url) == [f"budget_alert_{alert.day}_80"]

    async with open_budget(CONFIG, database=database_url) as budget:
        health = await budget.health()
        assert (health.daily_spend, health.dispatches, health.seq) == (Decimal("8.75"), 3, 3)
        assert health.alerts_sent == (0.8,)
        async with budget.subscribe() as updates:
            await budget.record("d", "1")
            assert (await budget.record("a", "7.5")).duplicate  # dedupe survives restart
            await trio.sleep(0.3)
            received = []
            with trio.move_on_after(0.5):
                async for update in updates:
                    received.append(update)
        assert not [u for u in received if isinstance(u, AlertNotice)]
        assert isinstance(received[-1], Spend) and received[-1].daily_spend == Decimal("9.75")
    assert _nudges(database_url) == [f"budget_alert_{alert.day}_80"]


async def test_day_rolls_over_at_midnight_while_costs_flow(database_url: str) -> None:
    config = make_config(daily_cap="10.00", timezone="Europe/Paris")
    # 23:59:00 in Paris on Dec 1st.
    clock = WallClock(datetime(2026, 12, 1, 22, 59, tzinfo=UTC))
    async with open_budget(config, database=database_url, clock=clock) as budget:
        before = Decimal(0)
        after = Decimal(0)
        seqs: dict[str, int] = {}
        for i in range(120):  # one cost per second, across midnight
            day = (await budget.health()).day
            receipt = await budget.record(f"id{i % 50}", "0.09")
            # Resends are duplicates on either side of midnight (the dedupe
            # window is the day and the one before), with the original seq.
            assert receipt.duplicate == (i >= 50)
            assert receipt.seq == seqs.setdefault(receipt.dispatch_id, receipt.seq)
            if day == "2026-12-01":
                before += 0 if receipt.duplicate else Decimal("0.09")
            else:
                assert not (await budget.record(f"new{i}", "0.01")).duplicate
                after += Decimal("0.01")
            clock.advance(1)
        health = await budget.health()
        assert health.day == "2026-12-02"
        assert health.daily_spend == after > 0
        assert health.alerts_sent == ()
        assert health.cycle_count == 0
        await budget.record("big", "8")  # crosses 80% on the new day

        async def nudged() -> bool:
            return len(_nudges(database_url)) == 1

        await eventually(nudged)
    old = _patch(database_url, "2026-12-01")
    assert old is not None and Decimal(old["daily_spend"]) == before
    assert _nudges(database_url) == ["budget_alert_2026-12-02_80"]
    by_day = rows(
        database_url, "SELECT day, count(*) FROM budget_journal GROUP BY day ORDER BY day"
    )
    assert [d for d, _ in by_day] == ["2026-12-01", "2026-12-02"]


async def test_rollover_happens_without_traffic(sqlite_url: str) -> None:
    clock = WallClock(datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC))
    async with open_budget(CONFIG, database=sqlite_url, clock=clock) as budget:
        await budget.record("a", "2")
        async with budget.subscribe() as updates:
            clock.advance(1)  # midnight; only the actor's ticker can notice
            with trio.fail_after(10):
                async for update in updates:
                    if isinstance(update, Spend) and update.day == "2026-12-02":
                        assert update.daily_spend == 0
                        break

        async def patched() -> bool:
            return _patch(sqlite_url, "2026-12-01") is not None

        await eventually(patched)
    assert _patch(sqlite_url, "2026-12-01")["daily_spend"] == "2"  # type: ignore[index]


async def test_shutdown_persists_fire_and_forget_costs(database_url: str) -> None:
    async with open_budget(CONFIG, database=database_url) as budget:
        day = (await budget.health()).day
        for i in range(500):
            await budget.send_cost(f"ff{i}", "0.01")
        await budget.cycle()
    journal = rows(database_url, "SELECT usd FROM budget_journal")
    assert len(journal) == 500
    assert sum(Decimal(str(u)) for (u,) in journal) == Decimal("5.00")
    final = _patch(database_url, day)
    assert final is not None and Decimal(final["daily_spend"]) == Decimal("5.00")
    assert (final["cycle_count"], final["dispatches"], final["seq"]) == (1, 500, 500)


async def test_calls_after_stop_raise_service_stopped(sqlite_url: str) -> None:
    async with open_budget(CONFIG, database=sqlite_url) as budget:
        pass
    with pytest.raises(ServiceStopped):
        await budget.record("late", "1")


async def test_more_concurrent_senders_than_one_batch_all_count(sqlite_url: str) -> None:
    """The actor drains its mailbox in batches of MAX_BATCH; none may be dropped."""
    from budget_actor.runtime.actor import MAX_BATCH

    senders = MAX_BATCH * 3 + 7
    async with open_budget(CONFIG, database=sqlite_url) as budget:
        with trio.fail_after(30):  # a dropped message would leave its sender waiting forever
            async with trio.open_nursery() as nursery:
                for i in range(senders):
                    nursery.start_soon(budget.record, f"s{i}", "0.001")
        health = await budget.health()
        assert (health.dispatches, health.seq) == (senders, senders)
        assert health.daily_spend == Decimal("0.001") * senders


async def test_a_subscriber_that_never_reads_gets_only_the_latest(sqlite_url: str) -> None:
    async with open_budget(CONFIG, database=sqlite_url) as budget:
        stuck = await budget.open_subscription()
        for i in range(300):
            await budget.send_cost(f"c{i}", "0.03")  # crosses 80% at 267
        last = await budget.record("last", "0.01")
        await trio.sleep(0.1)
        items = []
        with trio.move_on_after(0.2):
            while True:
                items.append(await stuck.next())
        budget.unsubscribe(stuck)
    assert [type(i).__name__ for i in items] == ["AlertNotice", "Published"]
    latest = items[-1]
    assert isinstance(latest, Published) and latest.spend.seq == last.seq == 301
    assert json.loads(latest.frame())["daily_spend"] == "9.01"


class FlakyStore(SqliteStore):
    """A real SQLite store whose writes crash (a bug, not an outage) ``failures`` times."""

    def __init__(self, path: str, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def write(self, *args: Any, **kwargs: Any) -> set[str]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("simulated persister bug")
        return super().write(*args, **kwargs)


# Real time, tiny backoffs: the autojump clock would also jump while the store
# works in its thread, spreading failures over fake minutes.
FAST_RESTARTS = RestartPolicy(backoff_initial_s=0.001, backoff_max_s=0.01)


async def test_a_crashing_persister_is_restarted_and_loses_nothing(sqlite_url: str) -> None:
    store = FlakyStore(sqlite_url.removeprefix("sqlite:///"), failures=3)
    async with open_budget(CONFIG, database=store, policy=FAST_RESTARTS) as budget:
        receipts = [await budget.record(f"r{i}", "0.5") for i in range(3)]
        assert store.failures == 0
        assert [r.seq for r in receipts] == [1, 2, 3]
        health = await budget.health()
        assert health.restarts == {"persister": 3}
        assert health.persist_latency_s > 0 and health.store_lag_s == 0
    assert rows(sqlite_url, "SELECT count(*) FROM budget_journal") == [(3,)]


async def test_a_persister_that_keeps_failing_escalates(sqlite_url: str) -> None:
    store = FlakyStore(sqlite_url.removeprefix("sqlite:///"), failures=10**6)
    policy = RestartPolicy(max_failures=3, window_s=60, backoff_initial_s=0.001)
    with pytest.RaisesGroup(
        pytest.RaisesExc(Escalation, match="persister failed 4 times"), flatten_subgroups=True
    ):
        async with open_budget(CONFIG, database=store, policy=policy) as budget:
            await budget.send_cost("x", "1")
            await trio.sleep(30)  # cancelled by the escalation long before


class BrokenOnce:
    """A wall clock that fails once when armed: a bug inside the actor."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self) -> datetime:
        if self.armed:
            self.armed = False
            raise RuntimeError("simulated actor bug")
        return datetime.now(UTC)


async def test_a_failed_actor_is_restarted_from_the_store(sqlite_url: str) -> None:
    clock = BrokenOnce()
    async with open_budget(
        CONFIG, database=sqlite_url, clock=clock, policy=FAST_RESTARTS
    ) as budget:
        for i in range(5):
            await budget.record(f"r{i}", "0.25")
        await budget.cycle()
        await budget.health()  # the cycle is handled before the clock is armed
        clock.armed = True
        with trio.fail_after(10), pytest.raises(ServiceStopped, match="resend"):
            await budget.record("boom", "5")  # its handling fails: never acknowledged
        with trio.fail_after(10):
            health = await budget.health()  # answered by the restarted actor
        assert (health.daily_spend, health.dispatches, health.seq) == (Decimal("1.25"), 5, 5)
        assert health.cycle_count == 1  # the failed actor's final flush wrote its patch
        receipt = await budget.record("after", "1")
        assert (receipt.seq, receipt.duplicate) == (6, False)
        assert (await budget.record("r0", "0.25")).duplicate
        assert not (await budget.record("boom", "5")).duplicate  # the resend counts


async def test_a_final_flush_larger_than_one_batch_keeps_patch_and_journal_in_step(
    sqlite_url: str,
) -> None:
    """The final patch is written after every cost it counts, never before."""
    from budget_actor.runtime.persister import MAX_BATCH

    count = MAX_BATCH * 2 + 123
    async with open_budget(CONFIG, database=sqlite_url) as budget:
        day = (await budget.health()).day
        for i in range(count):
            await budget.send_cost(f"f{i}", "0.01")
    patch = _patch(sqlite_url, day)
    journal = rows(sqlite_url, "SELECT count(*), max(seq) FROM budget_journal")[0]
    assert patch is not None and (patch["dispatches"], patch["seq"]) == (count, count)
    assert journal == (count, count)


async def test_calls_waiting_when_the_service_stops_are_told(sqlite_url: str) -> None:
    """Costs that reach the mailbox after the stop are not handled: their
    callers hear ServiceStopped instead of waiting forever."""
    outcomes: list[str] = []

    async def caller(budget: Budget, i: int) -> None:
        await trio.sleep(0.001 * (i % 50))  # some arrive after the stop
        try:
            await budget.record(f"c{i}", "0.01")
            outcomes.append("durable")
        except ServiceStopped:
            outcomes.append("stopped")

    with trio.fail_after(30):  # a forgotten waiter would hang here
        async with trio.open_nursery() as callers:
            async with open_budget(CONFIG, database=sqlite_url) as budget:
                for i in range(2000):
                    callers.start_soon(caller, budget, i)
                await trio.sleep(0.02)
    assert len(outcomes) == 2000
    assert 0 < outcomes.count("stopped") < 2000
    journaled = rows(sqlite_url, "SELECT count(*) FROM budget_journal")[0][0]
    assert journaled == outcomes.count("durable")


async def test_an_actor_that_keeps_failing_escalates(sqlite_url: str) -> None:
    class AlwaysBroken(BrokenOnce):
        def __call__(self) -> datetime:
            if self.armed:
                raise RuntimeError("simulated actor bug")
            return datetime.now(UTC)

    clock = AlwaysBroken()
    policy = RestartPolicy(max_failures=2, backoff_initial_s=0.001)
    with pytest.RaisesGroup(
        pytest.RaisesExc(Escalation, match="budget actor failed"), flatten_subgroups=True
    ):
        async with open_budget(CONFIG, database=sqlite_url, clock=clock, policy=policy) as budget:
            clock.armed = True
            with trio.fail_after(10):
                while True:
                    await budget.send_cost("x", "1")
                    await trio.sleep(0.01)
