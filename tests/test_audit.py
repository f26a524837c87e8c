"""`budget-actor verify`: the journal recomputes the day and must match the patch."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal

from budget_actor import make_config, open_budget, open_store
from budget_actor.core.audit import audit
from budget_actor.core.cost import Cost
from budget_actor.core.records import JournalEntry, Snapshot

from ._helpers import rows

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _e(seq: int, usd: str, dispatch_id: str | None = None) -> JournalEntry:
    return JournalEntry(
        seq=seq, day="2026-12-01", at=T0, cost=Cost(dispatch_id or f"d{seq}", Decimal(usd))
    )


def _patch(spend: str, dispatches: int, seq: int) -> Snapshot:
    return Snapshot(
        day="2026-12-01",
        daily_spend=Decimal(spend),
        daily_cap=Decimal(10),
        cycle_count=10,
        dispatches=dispatches,
        alerts_sent=(),
        seq=seq,
    )


def test_patch_matching_the_journal_up_to_its_seq_agrees() -> None:
    result = audit("2026-12-01", _patch("0.3", 2, 2), [_e(1, "0.1"), _e(2, "0.2"), _e(3, "5")])
    assert result.agrees and result.difference == 0
    assert (result.after_patch_dispatches, result.after_patch_spend) == (1, Decimal("5"))
    assert result.journal_spend == Decimal("5.3")


def test_a_patch_off_by_a_cent_disagrees() -> None:
    result = audit("2026-12-01", _patch("0.31", 2, 2), [_e(1, "0.1"), _e(2, "0.2")])
    assert not result.agrees and result.difference == Decimal("0.01")


def test_a_day_without_patch_has_nothing_to_disagree_with() -> None:
    assert audit("2026-12-01", None, [_e(1, "1")]).agrees  # no patch yet: nothing to compare
    assert audit("2026-12-01", None, []).agrees


def test_duplicate_ids_in_the_journal_disagree() -> None:
    assert not audit("2026-12-01", None, [_e(1, "1", "x"), _e(2, "1", "x")]).agrees


def _verify(url: str, day: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "budget_actor", "verify", "--database", url, "--day", day],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_verify_command_on_a_real_store(database_url: str) -> None:
    config = make_config(persist_every=2)
    async with open_budget(config, database=database_url) as budget:
        day = (await budget.health()).day
        await budget.record("a", "0.10")
        await budget.record("b", "0.25")
        await budget.cycle()
        await budget.cycle()
        await budget.record("c", "1")
    ok = _verify(database_url, day)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout and "$1.35" in ok.stdout
    # Tamper with the patch: verify must notice and name the difference.
    (body,) = rows(database_url, "SELECT body FROM quilt_patches WHERE type = 'budget'")[0]
    patch = body if isinstance(body, dict) else json.loads(body)
    assert patch["daily_spend"] == "1.35"
    tampered = json.dumps({**patch, "daily_spend": "1.30"})
    cast = "%s" if database_url.startswith("sqlite") else "%s::jsonb"
    rows(database_url, f"UPDATE quilt_patches SET body = {cast} WHERE type = 'budget'", (tampered,))
    bad = _verify(database_url, day)
    assert bad.returncode == 1
    assert "MISMATCH" in bad.stdout and "$-0.05" in bad.stdout


def test_verify_with_an_unreachable_database_exits_2() -> None:
    result = _verify("postgresql://postgres@127.0.0.1:1/x", "2026-12-01")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


async def test_verify_checks_every_instance_of_a_shared_budget(pg_url: str) -> None:
    """Two instances, a patch written between their costs: each instance's
    share is checked against its own journal rows, up to the seq the patch
    names for it; tampering with one share is found and named."""
    config = make_config(persist_every=1)
    async with (
        open_budget(config, database=pg_url, instance="one", spill=False) as one,
        open_budget(config, database=pg_url, instance="two", spill=False) as two,
    ):
        day = (await one.health()).day
        await one.record("a", "0.10")
        await two.record("b", "0.25")
        await two.record("c", "1")
        await one.cycle()  # a patch of all three
        await one.health()
        await one.record("d", "2")  # after the patch: normal, not a mismatch
    ok = _verify(pg_url, day)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "share one" in ok.stdout and "share two" in ok.stdout
    rows(pg_url, "UPDATE budget_shares SET spend = spend + 1 WHERE instance = 'two'")
    bad = _verify(pg_url, day)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout
    assert next(line for line in bad.stdout.splitlines() if "MISMATCH" in line).startswith(
        "share two"
    )


def test_verify_of_a_day_written_before_instances_shared_a_budget(pg_url: str) -> None:
    """A day of the single-instance journal, migrated: its patch names no
    shares, and is checked by its seq as before."""
    day = "2026-11-30"
    rows(
        pg_url,
        "CREATE TABLE budget_journal (seq bigint PRIMARY KEY, day text NOT NULL,"
        " dispatch_id text NOT NULL, usd numeric NOT NULL, recorded_at timestamptz NOT NULL,"
        " model text, agent text, input_tokens bigint, output_tokens bigint,"
        " UNIQUE (day, dispatch_id))",
    )
    rows(
        pg_url,
        "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at) VALUES"
        " (1, %s, 'a', 0.5, now()), (2, %s, 'b', 0.25, now()), (3, %s, 'c', 1, now())",
        (day, day, day),
    )
    old_patch = {
        "date": day,
        "daily_spend": "0.75",
        "daily_cap": "10.00",
        "cycle_count": 10,
        "dispatches": 2,
        "alerts_sent": [],
        "seq": 2,
    }
    rows(
        pg_url,
        "CREATE TABLE quilt_patches (type text NOT NULL, name text NOT NULL, body jsonb NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL"
        " DEFAULT now(), PRIMARY KEY (type, name))",
    )
    rows(
        pg_url,
        "INSERT INTO quilt_patches (type, name, body) VALUES ('budget', %s, %s::jsonb)",
        (f"budget_{day}", json.dumps(old_patch)),
    )
    before = _verify(pg_url, day)  # not migrated yet: nothing shared to check
    assert before.returncode == 0, before.stdout + before.stderr
    store = open_store(pg_url, "new")
    store.open()  # migrates
    store.close()
    after = _verify(pg_url, day)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "share " in after.stdout and "after the patch     1 costs, $1" in after.stdout
