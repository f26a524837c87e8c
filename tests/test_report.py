"""`budget-actor report`: the pure aggregation, and the command on both stores."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from budget_actor.cli.report import (
    Group,
    breakdown,
    build,
    last_days,
    merge,
    summarize_day,
    to_csv,
    to_json,
    to_table,
)
from budget_actor.core.cost import Cost
from budget_actor.core.records import JournalEntry, Snapshot
from budget_actor.stores.open import open_store

from ._client import Launcher, dispatcher, run_cli, wait_row

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
DAY = "2026-12-01"


def _e(
    seq: int,
    usd: str,
    model: str | None = None,
    agent: str | None = None,
    day: str = DAY,
    tokens: tuple[int | None, int | None] = (None, None),
) -> JournalEntry:
    return JournalEntry(
        seq=seq,
        day=day,
        at=T0,
        cost=Cost(
            f"d{seq}",
            Decimal(usd),
            model=model,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            agent=agent,
        ),
    )


def _patch(day: str, spend: str, cap: str, dispatches: int, seq: int) -> Snapshot:
    return Snapshot(
        day=day,
        daily_spend=Decimal(spend),
        daily_cap=Decimal(cap),
        cycle_count=1,
        dispatches=dispatches,
        alerts_sent=(),
        seq=seq,
    )


# -- pure ------------------------------------------------------------------------


def test_last_days_end_today_oldest_first() -> None:
    assert last_days(date(2026, 3, 1), 3) == ["2026-02-27", "2026-02-28", "2026-03-01"]
    assert last_days(date(2026, 3, 1), 1) == ["2026-03-01"]


def test_a_day_sums_exactly_and_takes_its_cap_from_the_patch() -> None:
    entries = [_e(1, "0.1"), _e(2, "0.2"), _e(3, "0.000000000001")]
    day = summarize_day(DAY, entries, _patch(DAY, "0.3", "2.50", 2, 2).body(), Decimal("10"))
    assert day.spend == Decimal("0.300000000001")  # a float sum would not be
    assert (day.cap, day.cap_from, day.dispatches) == (Decimal("2.50"), "patch", 3)
    assert day.utilization == pytest.approx(0.12)
    bare = summarize_day(DAY, entries[:2], None, Decimal("10.00"))
    assert (bare.spend, bare.cap, bare.cap_from) == (Decimal("0.3"), Decimal("10.00"), "default")
    assert bare.groups == ()


def test_a_day_with_a_patch_but_no_journal_shows_the_patch() -> None:
    day = summarize_day(DAY, [], _patch(DAY, "4.20", "5.00", 7, 7).body(), Decimal("10"))
    assert (day.spend, day.dispatches, day.cap) == (Decimal("4.20"), 7, Decimal("5.00"))
    empty = summarize_day(DAY, [], None, Decimal("10"))
    assert (empty.spend, empty.dispatches, empty.utilization) == (Decimal(0), 0, 0.0)


def test_breakdown_biggest_first_with_tokens_and_unnamed_costs() -> None:
    entries = [
        _e(1, "0.5", model="haiku", agent="a", tokens=(100, 10)),
        _e(2, "1.25", model="opus", agent="a", tokens=(50, None)),
        _e(3, "0.75", model="haiku", agent="b", tokens=(None, 5)),
        _e(4, "1.25", model=None, agent=None),
        _e(5, "1.25", model="gpt", agent="b"),
    ]
    by_model = breakdown(entries, "model")
    assert [(g.key, g.spend, g.dispatches) for g in by_model] == [
        ("gpt", Decimal("1.25"), 1),
        ("haiku", Decimal("1.25"), 2),
        ("opus", Decimal("1.25"), 1),
        (None, Decimal("1.25"), 1),  # ties by name, unnamed last
    ]
    haiku = by_model[1]
    assert (haiku.input_tokens, haiku.output_tokens) == (100, 15)
    by_agent = breakdown(entries, "agent")
    assert [(g.key, g.spend) for g in by_agent] == [
        ("b", Decimal("2.00")),
        ("a", Decimal("1.75")),
        (None, Decimal("1.25")),
    ]


def test_merge_sums_groups_across_days() -> None:
    a = Group(key="m", spend=Decimal("0.1"), dispatches=1, input_tokens=1, output_tokens=2)
    b = Group(key="m", spend=Decimal("0.2"), dispatches=2, input_tokens=3, output_tokens=4)
    c = Group(key="n", spend=Decimal("0.25"), dispatches=1, input_tokens=0, output_tokens=0)
    assert merge([a, c, b]) == (
        Group(key="m", spend=Decimal("0.3"), dispatches=3, input_tokens=4, output_tokens=6),
        c,
    )


def _two_days() -> tuple[list[JournalEntry], list[JournalEntry]]:
    first = [_e(1, "0.10", "haiku", "a", "2026-11-30"), _e(2, "0.20", "opus", "a", "2026-11-30")]
    second = [_e(3, "1.000001", "opus", "b"), _e(4, "0.05", None, "b")]
    return first, second


def test_report_totals_and_formats() -> None:
    first, second = _two_days()
    days = [
        summarize_day("2026-11-30", first, None, Decimal("10.00"), "model"),
        summarize_day(
            DAY, second, _patch(DAY, "1", "2.00", 1, 3).body(), Decimal("10.00"), "model"
        ),
    ]
    report = build(days, "model")
    assert (report.spend, report.dispatches) == (Decimal("1.350001"), 4)
    assert [(g.key, g.spend) for g in report.groups] == [
        ("opus", Decimal("1.200001")),
        ("haiku", Decimal("0.10")),
        (None, Decimal("0.05")),
    ]

    body = json.loads(to_json(report))
    assert body["total"] == {"spend": "1.350001", "dispatches": 4}
    assert body["days"][1]["daily_spend"] == "1.050001"
    assert body["days"][1]["daily_cap"] == "2.00" and body["days"][1]["cap_from"] == "patch"
    assert body["days"][0]["cap_from"] == "default"
    assert body["days"][1]["by_model"][0] == {
        "model": "opus",
        "spend": "1.000001",
        "dispatches": 1,
        "input_tokens": 0,
        "output_tokens": 0,
    }
    assert body["breakdown"][2]["model"] is None

    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert [(r["day"], r["model"], r["spend"]) for r in rows] == [
        ("2026-11-30", "opus", "0.20"),
        ("2026-11-30", "haiku", "0.10"),
        (DAY, "opus", "1.000001"),
        (DAY, "", "0.05"),
    ]
    plain = build(days)
    rows = list(csv.DictReader(io.StringIO(to_csv(plain))))
    assert rows[1] == {
        "day": DAY,
        "daily_spend": "1.050001",
        "daily_cap": "2.00",
        "cap_from": "patch",
        "utilization": repr(1.050001 / 2),
        "dispatches": "2",
    }

    table = to_table(report)
    assert "2026-11-30      0.30  10.00*" in table
    assert "total       1.350001" in table
    assert "* no budget patch that day: the cap is --daily-cap" in table
    assert "by model, 2026-11-30 to 2026-12-01" in table
    assert "(none)" in table and "88.9%" in table  # opus: 1.200001 of 1.350001
    assert "by model" not in to_table(plain)


# -- the command -----------------------------------------------------------------


def _today() -> date:
    return datetime.now(UTC).date()


def _fill(url: str) -> tuple[str, str]:
    """Yesterday with a budget patch (cap 2.00), today without; (yesterday, today)."""
    today = _today()
    yesterday = (today - timedelta(days=1)).isoformat()
    entries = [
        _e(1, "0.10", "haiku", "writer", yesterday, (10, 1)),
        _e(2, "0.20", "opus", "writer", yesterday, (20, 2)),
        _e(3, "0.000001", "haiku", "reader", today.isoformat(), (30, 3)),
        _e(4, "1.5", "opus", None, today.isoformat()),
    ]
    store = open_store(url)
    store.open()
    try:
        store.write(entries, [_patch(yesterday, "0.30", "2.00", 2, 2)], [], T0)
    finally:
        store.close()
    return yesterday, today.isoformat()


async def test_report_command_on_a_store(database_url: str) -> None:
    yesterday, today = _fill(database_url)
    done = await run_cli(
        "report", "--database", database_url, "--days", "3", "--by", "model", "--format", "json"
    )
    assert done.code == 0, done.stderr
    body = json.loads(done.stdout)
    assert [d["day"] for d in body["days"]][1:] == [yesterday, today]
    assert body["days"][0]["dispatches"] == 0 and body["days"][0]["daily_spend"] == "0"
    y, t = body["days"][1], body["days"][2]
    assert (y["daily_spend"], y["daily_cap"], y["cap_from"]) == ("0.30", "2.00", "patch")
    assert (t["daily_spend"], t["daily_cap"], t["cap_from"]) == ("1.500001", "10.00", "default")
    assert body["total"] == {"spend": "1.800001", "dispatches": 4}
    assert body["breakdown"] == [
        {"model": "opus", "spend": "1.70", "dispatches": 2, "input_tokens": 20, "output_tokens": 2},
        {
            "model": "haiku",
            "spend": "0.100001",
            "dispatches": 2,
            "input_tokens": 40,
            "output_tokens": 4,
        },
    ]

    by_agent = await run_cli(
        "report",
        "--database",
        database_url,
        "--days",
        "2",
        "--by",
        "agent",
        "--format",
        "csv",
        env={"BUDGET_DAILY_CAP": "5"},
    )
    assert by_agent.code == 0, by_agent.stderr
    assert by_agent.stdout.splitlines() == [
        "day,agent,spend,dispatches,input_tokens,output_tokens",
        f"{yesterday},writer,0.30,2,30,3",
        f"{today},,1.5,1,0,0",
        f"{today},reader,0.000001,1,30,3",
    ]

    table = await run_cli("report", "--database", database_url, "--daily-cap", "3.00")
    assert table.code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["day", "spend", "cap", "used", "dispatches"]
    assert len(lines) == 1 + 7 + 1 + 1  # header, 7 days, total, footnote
    assert lines[7].split() == [today, "1.500001", "3.00*", "50.0%", "2"]
    assert lines[6].split() == [yesterday, "0.30", "2.00", "15.0%", "2"]


async def test_report_while_the_service_runs(database_url: str, tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    try:
        service = await launcher.start(database_url, "--daily-cap", "3.00", "--persist-every", "1")
        async with dispatcher(service.ws_url) as client:
            await client.record("r-1", "0.1", model="haiku", agent="writer")
            await client.record("r-2", "0.2", model="haiku", agent="writer")
            await client.cycle()  # writes the budget patch
            health = await client.health()
        await wait_row(database_url, "budget", f"budget_{health.day}")
        done = await run_cli(
            "report", "--database", database_url, "--days", "1", "--format", "json"
        )
        assert done.code == 0, done.stderr
        (day,) = json.loads(done.stdout)["days"]
        assert (day["daily_spend"], day["dispatches"]) == ("0.3", 2)
        assert (day["daily_cap"], day["cap_from"]) == ("3.00", "patch")
        assert await service.stop() == 0
        after = await run_cli("report", "--database", database_url, "--days", "1", "--by", "agent")
        assert after.code == 0, after.stderr
        assert "writer" in after.stdout and "100.0%" in after.stdout
    finally:
        launcher.close()


async def test_report_on_a_missing_database_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    done = await run_cli("report", "--database", f"sqlite:///{path}")
    assert done.code == 2
    assert done.stderr.startswith("budget-actor: error: database unreachable")
    assert done.stderr.count("\n") == 1
    assert not path.exists()
    pg = await run_cli("report", "--database", "postgresql://postgres@127.0.0.1:1/x")
    assert pg.code == 2 and pg.stderr.count("\n") == 1


@pytest.fixture
def filled_sqlite(sqlite_url: str) -> Iterator[str]:
    _fill(sqlite_url)
    yield sqlite_url


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--days", "0"], "`days` must be in 1..366"),
        (["--days", "367"], "`days` must be in 1..366"),
        (["--daily-cap", "-1"], "`daily-cap` must not be negative"),
        (["--daily-cap", "0"], "`daily-cap` must be greater than 0"),
        (["--timezone", "Mars/Base"], "`timezone` is not a known time zone"),
        (["--by", "color"], "invalid choice"),
        (["--format", "xml"], "invalid choice"),
    ],
)
async def test_report_refuses_bad_options(
    filled_sqlite: str, args: list[str], message: str
) -> None:
    done = await run_cli("report", "--database", filled_sqlite, *args)
    assert done.code == 2
    assert message in done.stderr and done.stderr.count("\n") == 1
