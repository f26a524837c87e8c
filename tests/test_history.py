"""``GET /history?days=N``: the last N days oldest first, today last (live),
and today's cumulative spend once a minute from the journal, on both stores."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import msgspec
import pytest
import trio

from budget_actor import make_config, open_budget, open_store
from budget_actor.core.access import Access
from budget_actor.core.cost import Cost
from budget_actor.core.history import Curve, DayTotal, last_days, parse_days
from budget_actor.core.records import JournalEntry, Snapshot
from budget_actor.net.server import ServerOptions, serve

from ._client import sql_setup
from ._helpers import WallClock

# Noon, so that "earlier today" is hours long whatever the test does.
NOW = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
TOKENS = Access(dispatcher_token="d-secret", observer_token="o-secret")


# -- pure --------------------------------------------------------------------------


def test_the_curve_is_cumulative_once_a_minute_and_exact() -> None:
    curve = Curve("2026-12-10")
    t = datetime(2026, 12, 10, 9, 0, 5, tzinfo=UTC)
    curve.add([(t, Decimal("0.1")), (t + timedelta(seconds=30), Decimal("0.2"))])
    curve.add([(t + timedelta(minutes=5), Decimal("1E-7"))])
    # A row of an earlier minute arriving late still lands in its minute.
    curve.add([(t + timedelta(seconds=50), Decimal("0.05"))])
    points = [(p.t, p.daily_spend) for p in curve.points()]
    assert points == [
        (t + timedelta(seconds=50), Decimal("0.35")),
        (t + timedelta(minutes=5), Decimal("0.3500001")),
    ]


def test_days_parameter() -> None:
    assert parse_days(None) == 30 and parse_days(["1"]) == 1 and parse_days(["366"]) == 366
    for bad in (["0"], ["367"], ["-1"], ["x"], [""], ["1.5"], ["٣"], ["1", "2"]):
        with pytest.raises(ValueError):
            parse_days(bad)
    assert last_days("2026-03-01", 3) == ["2026-02-27", "2026-02-28", "2026-03-01"]


# -- the store -----------------------------------------------------------------------


def test_sqlite_day_totals_trust_a_patch_only_when_it_holds_every_row(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    store.open()
    try:
        at = datetime(2026, 12, 5, 9, tzinfo=UTC)
        entries = [
            JournalEntry(seq=n, day="2026-12-05", at=at, cost=Cost(f"a-{n}", Decimal(usd)))
            for n, usd in [(1, "0.1"), (2, "0.2"), (3, "1E-7")]
        ]
        # The patch lags (a crash after it): the journal's exact sum wins.
        lagging = Snapshot(
            day="2026-12-05",
            daily_spend=Decimal("0.1"),
            daily_cap=Decimal("3"),
            cycle_count=1,
            dispatches=1,
            alerts_sent=(),
            seq=1,
        )
        # A day known from its patch alone (an older version wrote no journal).
        patch_only = msgspec.structs.replace(
            lagging, day="2026-12-06", daily_spend=Decimal("5"), dispatches=7, seq=0
        )
        store.write(entries, [], [], at)
        # Written as they were (the store writes a patch as the sum of the
        # day's shares, which never lags its own transaction).
        patches = [lagging, patch_only]
        sql_setup(
            sqlite_url,
            [
                *(
                    (
                        "INSERT OR REPLACE INTO quilt_patches VALUES (%s, %s, %s, %s, %s)",
                        ("budget", snap.patch_name, json.dumps(snap.body()), "x", "x"),
                    )
                    for snap in patches
                ),
                (
                    "INSERT INTO quilt_patches VALUES (%s, %s, %s, %s, %s)",
                    ("budget", "budget_2026-12-07", "{}", "x", "x"),
                ),
            ],
        )
        totals = store.day_totals("2026-12-01", "2026-12-10")
    finally:
        store.close()
    assert totals == {
        "2026-12-05": DayTotal(Decimal("0.3000001"), 3, Decimal("3")),
        "2026-12-06": DayTotal(Decimal("5"), 7, Decimal("3")),
    }


# -- in process, on both stores ----------------------------------------------------


async def _seed(database_url: str, clock: WallClock) -> None:
    """Costs on three earlier days (one with a patch, over the cap) and at
    three moments of today; then a service restarts at NOW."""
    config = make_config(daily_cap="1.00", persist_every=1)
    async with open_budget(config, database=database_url, clock=clock, spill=False) as budget:
        clock.now = NOW - timedelta(days=3, hours=1)
        await budget.record("old-1", "0.25")
        await budget.record("old-2", "0.5")
        clock.now = NOW - timedelta(days=1, hours=3)
        await budget.record("y-1", "1.2")  # over the cap
        await budget.cycle()  # writes yesterday's patch
        for hours, dispatch_id, usd in [(4, "t-1", "0.1"), (2, "t-2", "0.2"), (1, "t-3", "0.3")]:
            clock.now = NOW - timedelta(hours=hours)
            await budget.record(dispatch_id, usd)
            await budget.record(dispatch_id + "b", "0.0000001")  # same minute
        clock.now = NOW


async def test_history_of_a_month_and_today(database_url: str) -> None:
    clock = WallClock(NOW - timedelta(days=4))
    await _seed(database_url, clock)
    config = make_config(daily_cap="2.00")  # today's cap is the configured one
    async with open_budget(config, database=database_url, clock=clock, spill=False) as budget:
        history = await budget.history()
        assert len(history.days) == 30
        days = {d.day: d for d in history.days}
        assert [d.day for d in history.days] == sorted(days) and history.days[
            -1
        ].day == "2026-12-10"
        assert history.days[0].day == "2026-11-11"
        three_ago, yesterday, today = days["2026-12-07"], days["2026-12-09"], days["2026-12-10"]
        assert (three_ago.daily_spend, three_ago.dispatches) == (Decimal("0.75"), 2)
        assert (yesterday.daily_spend, yesterday.dispatches) == (Decimal("1.2"), 1)
        # A past day's cap is its patch's (written at rollover or by a
        # cycle), or the configured one for a day without a patch.
        assert yesterday.daily_cap == three_ago.daily_cap == Decimal("1.00")
        empty = days["2026-12-08"]
        assert (empty.daily_spend, empty.dispatches, empty.daily_cap) == (0, 0, Decimal("2.00"))
        assert (today.daily_spend, today.dispatches, today.daily_cap) == (
            Decimal("0.6000003"),
            6,
            Decimal("2.00"),
        )
        # Today: one point per minute with costs, cumulative, in time order.
        curve = [(p.t.astimezone(UTC), p.daily_spend) for p in history.today]
        assert [round((NOW - t).total_seconds() / 3600) for t, _ in curve] == [4, 2, 1]
        assert [s for _, s in curve] == [
            Decimal("0.1000001"),
            Decimal("0.3000002"),
            Decimal("0.6000003"),
        ]
        assert history.today_start == datetime(2026, 12, 10, tzinfo=UTC)

        # New costs show at once; a short window is just as right.
        clock.now = NOW + timedelta(minutes=3)
        await budget.record("t-4", "0.4")
        again = await budget.history(2)
        assert [d.day for d in again.days] == ["2026-12-09", "2026-12-10"]
        assert again.today[-1].daily_spend == Decimal("1.0000003") == again.days[-1].daily_spend
        assert len(again.today) == 4
        with pytest.raises(ValueError):
            await budget.history(367)


async def test_history_in_the_configured_time_zone(sqlite_url: str) -> None:
    clock = WallClock(datetime(2026, 12, 10, 1, 30, tzinfo=UTC))  # 2026-12-09 in New York
    config = make_config(daily_cap="1.00", timezone="America/New_York")
    async with open_budget(config, database=sqlite_url, clock=clock) as budget:
        await budget.record("ny-1", "0.3")
        history = await budget.history(1)
    assert [d.day for d in history.days] == ["2026-12-09"]
    assert history.today_start == datetime(2026, 12, 9, 5, 0, tzinfo=UTC)
    assert [p.daily_spend for p in history.today] == [Decimal("0.3")]


# -- over HTTP -----------------------------------------------------------------------


async def _get(port: int, target: str, headers: str = "", method: str = "GET") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {target} HTTP/1.1\r\nhost: x\r\n{headers}\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_get_history_needs_an_observer_token_and_a_good_days(sqlite_url: str) -> None:
    config = make_config(daily_cap="1.00")
    async with open_budget(config, database=sqlite_url) as budget, trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve, options=ServerOptions(access=TOKENS)), budget, "127.0.0.1", 0
        )
        await budget.record("h-1", "0.3")
        assert (await _get(port, "/history"))[0] == 401
        assert (await _get(port, "/history?token=wrong"))[0] == 401
        status, body = await _get(port, "/history?token=o-secret")
        assert status == 200
        answer: Any = json.loads(body)
        assert set(answer) == {"days", "today", "today_start"}
        assert len(answer["days"]) == 30
        today = datetime.now(UTC).date().isoformat()
        assert answer["days"][-1] == {
            "day": today,
            "daily_spend": "0.3",
            "dispatches": 1,
            "daily_cap": "1.00",
        }
        assert [p["daily_spend"] for p in answer["today"]] == ["0.3"]
        assert datetime.fromisoformat(answer["today"][0]["t"]).date().isoformat() == today
        bearer = "authorization: Bearer d-secret\r\n"
        status, body = await _get(port, "/history?days=366", bearer)
        assert status == 200 and len(json.loads(body)["days"]) == 366
        for bad in ("0", "367", "abc", "7&days=8"):
            status, body = await _get(port, f"/history?days={bad}", bearer)
            assert status == 400 and b"days" in body, (bad, body)
        status, body = await _get(port, "/history?days=2", bearer, method="HEAD")
        assert (status, body) == (200, b"")
        nursery.cancel_scope.cancel()


def test_a_curve_being_replaced_is_read_whole_meanwhile() -> None:
    # PostgreSQL replaces the curve in a worker thread while another
    # request of the page may read it on the event loop: that reader sees
    # the old curve or the new one, never half of the new one.
    t = datetime(2026, 12, 10, 9, 0, 5, tzinfo=UTC)
    curve = Curve("2026-12-10")
    curve.replace([(t, Decimal("0.1")), (t + timedelta(minutes=1), Decimal("0.2"))])
    seen = []

    def minutes() -> Any:
        for n in range(3):
            yield t + timedelta(minutes=n), Decimal("1")
            seen.append([p.daily_spend for p in curve.points()])

    curve.replace(minutes())
    assert seen[:2] == [[Decimal("0.1"), Decimal("0.3")]] * 2
    assert [p.daily_spend for p in curve.points()] == [Decimal(1), Decimal(2), Decimal(3)]
