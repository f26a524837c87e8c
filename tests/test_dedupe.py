"""Dedupe across midnight and beyond the cache: a dispatch_id counts once in
its day and the day next to it, across restarts and instances, whether or
not the ledger still remembers it. On both stores (real SQLite, real
PostgreSQL), in the store, in process, and with a real `serve` under a
faked clock (Debian's `faketime`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from budget_actor import open_budget, open_store
from budget_actor.core.config import make_config
from budget_actor.core.cost import Cost
from budget_actor.core.records import Alert, JournalEntry
from budget_actor.stores.postgres import PostgresStore
from budget_actor.stores.store import Store

from ._client import STOP_TIMEOUT, Service, child_env, command, connect
from ._helpers import WallClock, rows

D1, D2, D3, D4 = "2026-12-01", "2026-12-02", "2026-12-03", "2026-12-04"
T0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def _entry(seq: int, dispatch_id: str, usd: str, day: str) -> JournalEntry:
    return JournalEntry(seq=seq, day=day, at=T0, cost=Cost(dispatch_id, Decimal(usd)))


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = open_store(database_url)
    s.open()
    yield s
    s.close()


def _share(url: str, day: str) -> tuple[Decimal, int]:
    found = rows(url, f"SELECT spend, dispatches FROM budget_shares WHERE day = '{day}'")
    return (Decimal(str(found[0][0])), int(found[0][1])) if found else (Decimal(0), 0)


# -- the store: its unique keys are the dedupe window --------------------------


def test_an_id_counted_the_day_before_is_refused_with_the_original(
    database_url: str, store: Store
) -> None:
    store.write([_entry(1, "x", "1.5", D1)], [], [], T0)
    result = store.write([_entry(2, "x", "1.5", D2), _entry(3, "y", "0.25", D2)], [], [], T0)
    assert result.duplicates == {2: (1, D1)}
    assert _share(database_url, D1) == (Decimal("1.5"), 1)  # stays in its first day
    assert _share(database_url, D2) == (Decimal("0.25"), 1)
    assert [(e.cost.dispatch_id, e.day) for e in store.journal(D2)] == [("y", D2)]


def test_two_days_apart_an_id_counts_again(database_url: str, store: Store) -> None:
    store.write([_entry(1, "x", "1", D1)], [], [], T0)
    assert store.write([_entry(2, "x", "1", D3)], [], [], T0).duplicates == {}
    # ...and D2, next to both, finds the earlier as the original.
    assert store.write([_entry(3, "x", "1", D2)], [], [], T0).duplicates == {3: (1, D1)}
    assert _share(database_url, D3) == (Decimal("1"), 1)


def test_a_late_row_of_the_day_before_is_refused_too(database_url: str, store: Store) -> None:
    """An outage across midnight: the spill file drains a cost of D1 after
    its resend was counted on D2. The key is symmetric: the earlier count
    in the database wins, whatever its day."""
    store.write([_entry(5, "x", "2", D2)], [], [], T0)
    assert store.write([_entry(4, "x", "2", D1)], [], [], T0).duplicates == {4: (5, D2)}
    assert _share(database_url, D1) == (Decimal(0), 0)


def test_one_batch_across_midnight_counts_an_id_once(database_url: str, store: Store) -> None:
    batch = [_entry(1, "x", "1", D1), _entry(2, "x", "1", D2), _entry(3, "z", "1", D2)]
    assert store.write(batch, [], [], T0).duplicates == {2: (1, D1)}
    assert store.write(batch, [], [], T0).duplicates == {2: (1, D1)}  # retried: the same
    assert (_share(database_url, D1), _share(database_url, D2)) == (
        (Decimal(1), 1),
        (Decimal(1), 1),
    )


def test_find_looks_in_the_window(store: Store) -> None:
    store.write(
        [_entry(1, "a", "1", D1), _entry(2, "b", "1", D2), _entry(3, "c", "1", D4)], [], [], T0
    )
    assert store.find(D2, ["a", "b", "c", "d"]) == {"a": (1, D1), "b": (2, D2)}
    assert store.find(D3, ["a", "b", "c"]) == {"b": (2, D2), "c": (3, D4)}


def test_a_nudge_waits_for_the_stores_own_figure(store: Store) -> None:
    """The ledger's figure can run ahead by a resend that the store then
    refuses: a threshold's nudge row needs the store's spend to reach it."""
    alert = Alert(
        to="AG Lu",
        day=D2,
        threshold=Decimal("0.8"),
        daily_spend=Decimal("9"),
        daily_cap=Decimal("10"),
        created_at=T0,
    )
    store.write([_entry(1, "x", "9", D1)], [], [], T0)
    result = store.write([_entry(2, "x", "9", D2)], [], [alert], T0)
    assert result.duplicates == {2: (1, D1)}
    assert result.nudges == {f"budget_alert_{D2}_80": "premature"}
    store.write([_entry(3, "y", "8", D2)], [], [], T0)
    assert store.write([], [], [alert], T0).inserted == {f"budget_alert_{D2}_80"}


def test_instances_racing_at_midnight_count_an_id_once(pg_url: str) -> None:
    """Instance A inserts x on D1 and has not committed; instance B, already
    past midnight, inserts x on D2. B's insert waits on A's row in the
    unique key, then finds it: counted once, on D1."""
    b = PostgresStore(pg_url, "b")
    b.open()
    a = psycopg.connect(pg_url)
    try:
        a.execute(
            "INSERT INTO budget_journal (instance, seq, day, dispatch_id, usd, recorded_at)"
            " VALUES ('a', 7, %s, 'x', 1, now())",
            (D1,),
        )
        done: list[Any] = []
        writer = threading.Thread(
            target=lambda: done.append(b.write([_entry(1, "x", "1", D2)], [], [], T0))
        )
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()  # waiting for A's row
        a.commit()
        writer.join(10)
        assert done and done[0].duplicates == {1: (7, D1)}
        assert _share(pg_url, D2) == (Decimal(0), 0)
    finally:
        a.close()
        b.close()


def test_an_old_journal_keeps_its_double_counts_and_is_deduped_from_its_last_day(
    database_url: str,
) -> None:
    """A journal written before the window crossed midnight may hold an id
    on two adjacent days. Opening it still works: the new keys hold from
    the last journaled day on."""
    store = open_store(database_url)
    store.open()
    store.close()
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.execute("DROP INDEX budget_journal_pair_even")
            conn.execute("DROP INDEX budget_journal_pair_odd")
            conn.executemany(
                "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at)"
                " VALUES (?, ?, 'old', '1', '2026-12-01T00:00:00+00:00')",
                [(1, D1), (2, D2)],
            )
    else:
        with psycopg.connect(database_url) as conn:
            conn.execute("DROP INDEX budget_journal_pair_even")
            conn.execute("DROP INDEX budget_journal_pair_odd")
            conn.execute(
                "INSERT INTO budget_journal (instance, seq, day, dispatch_id, usd, recorded_at)"
                " VALUES ('', 1, %s, 'old', 1, now()), ('', 2, %s, 'old', 1, now())",
                (D1, D2),
            )
    store = open_store(database_url)
    store.open()
    try:
        assert store.write([_entry(3, "old", "1", D3)], [], [], T0).duplicates == {3: (2, D2)}
    finally:
        store.close()


def test_a_sqlite_journal_from_before_the_shares_gets_them(sqlite_url: str) -> None:
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE budget_journal (seq INTEGER PRIMARY KEY, day TEXT NOT NULL,"
            " dispatch_id TEXT NOT NULL, usd TEXT NOT NULL, recorded_at TEXT NOT NULL, model TEXT,"
            " agent TEXT, input_tokens INTEGER, output_tokens INTEGER, UNIQUE (day, dispatch_id))"
        )
        conn.executemany(
            "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at)"
            " VALUES (?, ?, ?, ?, '2026-12-01T00:00:00+00:00')",
            [(1, D1, "a", "0.1"), (2, D1, "b", "0.000000000002"), (3, D2, "c", "5")],
        )
    store = open_store(sqlite_url)
    store.open()
    try:
        restored = store.load(D1)
        assert restored.patch is not None
        assert (restored.patch.daily_spend, restored.patch.dispatches, restored.max_seq) == (
            Decimal("0.100000000002"),
            2,
            3,
        )
    finally:
        store.close()


# -- in process: the ledger forgets, the store does not ------------------------


async def test_an_id_that_left_the_cache_is_still_a_duplicate_also_after_a_restart(
    database_url: str,
) -> None:
    config = make_config(daily_cap="100", dedupe_cache=3)
    async with open_budget(config, database=database_url) as budget:
        first = await budget.record("a", "1.25")
        for i in range(10):  # "a" leaves the cache of 3
            await budget.record(f"other-{i}", "0.5")
        again = await budget.record("a", "1.25")
        assert (again.duplicate, again.seq) == (True, first.seq)
        health = await budget.health()
        assert (health.daily_spend, health.dispatches) == (Decimal("6.25"), 11)
        assert health.duplicates == 1
        # Known again (the store told): answered at once from now on.
        assert (await budget.record("a", "1.25")).seq == first.seq
    async with open_budget(config, database=database_url) as budget:
        again = await budget.record("a", "1.25")
        assert (again.duplicate, again.seq) == (True, first.seq)
        assert (await budget.record("other-0", "0.5")).duplicate
        health = await budget.health()
        assert (health.daily_spend, health.dispatches) == (Decimal("6.25"), 11)
        admission = await budget.admit("other-1", "0.5")
        assert not admission.allowed and "already counted today" in (admission.reason or "")
        assert (await budget.admit("fresh", "0.5")).allowed


@pytest.mark.parametrize("cache", [0, 1000])
async def test_a_cost_resent_after_midnight_is_a_duplicate_with_the_original_seq(
    database_url: str, cache: int
) -> None:
    config = make_config(daily_cap="100", dedupe_cache=cache)
    clock = WallClock(datetime(2026, 12, 1, 23, 59, 58, tzinfo=UTC))
    async with open_budget(config, database=database_url, clock=clock) as budget:
        first = await budget.record("late", "2.5")
        await budget.record("also-late", "1")
        clock.advance(4)  # 00:00:02 on the 2nd
        again = await budget.record("late", "2.5")
        assert (again.duplicate, again.seq) == (True, first.seq)
        health = await budget.health()
        assert (health.day, health.daily_spend, health.dispatches) == (D2, 0, 0)
        new = await budget.record("new", "0.5")
        assert not new.duplicate
    # After a restart on the new day, the ledger knows nothing: the store decides.
    async with open_budget(config, database=database_url, clock=clock) as budget:
        again = await budget.record("also-late", "1")
        assert again.duplicate and again.seq == first.seq + 1
        health = await budget.health()
        assert (health.day, health.daily_spend, health.dispatches) == (D2, Decimal("0.5"), 1)
        admission = await budget.admit("late", "1")
        assert not admission.allowed and D1 in (admission.reason or "")
    patch = rows(database_url, f"SELECT body FROM quilt_patches WHERE name = 'budget_{D1}'")
    body = patch[0][0] if isinstance(patch[0][0], dict) else json.loads(patch[0][0])
    assert (body["daily_spend"], body["dispatches"]) == ("3.5", 2)  # in their first day
    journal = rows(database_url, "SELECT day, dispatch_id FROM budget_journal ORDER BY seq")
    assert [tuple(r) for r in journal] == [(D1, "late"), (D1, "also-late"), (D2, "new")]
    # Two days later the window has passed: the id counts again.
    clock.advance(2 * 86_400)
    async with open_budget(config, database=database_url, clock=clock) as budget:
        assert not (await budget.record("late", "2.5")).duplicate


# -- a real `serve` across midnight, under Debian's faketime --------------------

FAKETIME = shutil.which("faketime") or "/usr/bin/faketime"
REQUIRE_FAKETIME = os.environ.get("BUDGET_REQUIRE_FAKETIME") == "1"


def _faketime() -> str:
    if os.path.exists(FAKETIME):
        return FAKETIME
    if REQUIRE_FAKETIME:
        pytest.fail("faketime required (BUDGET_REQUIRE_FAKETIME=1) but not installed")
    pytest.skip("faketime is not installed (Debian package faketime)")


class _Faked(Service):
    """faketime runs the service as its child and passes on its exit
    status, but not signals: those go to the child."""

    def signal(self, signum: int) -> None:
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return  # faketime has exited already
        for child in children:
            os.kill(int(child), signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        super().kill()

    def terminate_sync(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        super().terminate_sync()


async def _serve_at(start: str, database: str, workdir: Path, n: int) -> Service:
    """`budget-actor serve` whose wall clock starts at ``start`` (UTC) and
    runs on from there; its monotonic clock (trio's) is left alone."""
    stderr = workdir / f"faked-{n}.stderr"
    env = child_env({"TZ": "UTC", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    argv = [_faketime(), start, *command("serve", "--port", "0", "--database", database)]
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=workdir,
            env=env,
        )
    service = _Faked(proc, stderr)
    try:
        await service.wait_ready()
    except BaseException:
        service.terminate_sync()
        raise
    return service


@pytest.mark.slow
async def test_a_real_serve_acks_a_resend_after_midnight_as_a_duplicate(
    database_url: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "faked"
    workdir.mkdir()
    service = await _serve_at("2026-12-02 23:59:57", database_url, workdir, 1)
    try:
        async with connect(service.ws_url) as conn:
            health = await conn.health()
            assert health["day"] == D2, health  # the faked clock is what serve sees
            first = await conn.cost("lost-ack", "1.5")
            assert (first["type"], first["duplicate"]) == ("ack", False)
            with trio.fail_after(15):
                while (await conn.health())["day"] != D3:
                    await trio.sleep(0.2)
            again = await conn.cost("lost-ack", "1.5")
            assert (again["duplicate"], again["seq"]) == (True, first["seq"])
            health = await conn.health()
            assert (health["daily_spend"], health["dispatches"]) == ("0", 0)
        assert await service.stop() == 0
    finally:
        service.terminate_sync()
    # Restarted after midnight: nothing in memory, the store's key decides.
    service = await _serve_at("2026-12-03 00:00:30", database_url, workdir, 2)
    try:
        async with connect(service.ws_url) as conn:
            again = await conn.cost("lost-ack", "1.5")
            assert (again["duplicate"], again["seq"]) == (True, first["seq"])
            assert (await conn.health())["dispatches"] == 0
        assert await service.stop() == 0
    finally:
        service.terminate_sync()
    patch = rows(database_url, f"SELECT body FROM quilt_patches WHERE name = 'budget_{D2}'")
    body = patch[0][0] if isinstance(patch[0][0], dict) else json.loads(patch[0][0])
    assert (body["daily_spend"], body["dispatches"]) == ("1.5", 1)


async def test_a_costs_batch_after_midnight_dedupes_each_item(database_url: str) -> None:
    """`costs` (one message for many items) as `cost`: items counted
    yesterday, whether still in the cache, evicted, or from before a
    restart, are duplicates with their original seqs; the others count."""
    config = make_config(daily_cap="100", dedupe_cache=2)
    clock = WallClock(datetime(2026, 12, 1, 23, 59, 50, tzinfo=UTC))
    async with open_budget(config, database=database_url, clock=clock) as budget:
        first = [await budget.record(f"y-{i}", "1") for i in range(4)]  # y-0, y-1 evicted
        clock.advance(20)
        items = [Cost(f"y-{i}", Decimal("1")) for i in (0, 3)] + [Cost("new-1", Decimal(2))]
        receipt = await budget.submit_many(items)
        await receipt.durable.wait()
        assert receipt.duplicates == [True, True, False]
        assert receipt.seqs[:2] == [first[0].seq, first[3].seq]
        assert (await budget.health()).daily_spend == Decimal("2")
    async with open_budget(config, database=database_url, clock=clock) as budget:
        receipt = await budget.submit_many([Cost("y-1", Decimal("1")), Cost("new-2", Decimal(3))])
        await receipt.durable.wait()
        assert (receipt.duplicates, receipt.seqs[0]) == ([True, False], first[1].seq)
        assert (await budget.health()).daily_spend == Decimal("5")
