"""One contract suite for both stores, against real SQLite and real PostgreSQL."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from budget_actor import StoreError, open_store
from budget_actor.core.cost import Cost
from budget_actor.core.records import Alert, JournalEntry, Snapshot
from budget_actor.stores.postgres import PostgresStore
from budget_actor.stores.postgres.store import COPY_MIN_ROWS, COPY_PAUSE_BATCHES
from budget_actor.stores.store import Store

T0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
DAY = "2026-12-01"


def _entry(seq: int, dispatch_id: str, usd: str, day: str = DAY) -> JournalEntry:
    return JournalEntry(
        seq=seq, day=day, at=T0, cost=Cost(dispatch_id, Decimal(usd), model="m", agent="a")
    )


def _snapshot(seq: int, spend: str, day: str = DAY, cycles: int = 10) -> Snapshot:
    return Snapshot(
        day=day,
        daily_spend=Decimal(spend),
        daily_cap=Decimal("10.00"),
        cycle_count=cycles,
        dispatches=seq,
        alerts_sent=(Decimal("0.8"),),
        seq=seq,
    )


def _alert(threshold: str = "0.8", day: str = DAY) -> Alert:
    return Alert(
        to="AG Lu",
        day=day,
        threshold=Decimal(threshold),
        daily_spend=Decimal("8.5"),
        daily_cap=Decimal("10.00"),
        created_at=T0,
    )


@pytest.fixture
def store(database_url: str) -> Any:
    s = open_store(database_url)
    s.open()
    yield s
    s.close()


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_open_creates_tables_and_is_idempotent(database_url: str, store: Store) -> None:
    store.open()  # a second open must not fail or wipe anything
    assert _rows(database_url, "SELECT count(*) FROM quilt_patches") == [(0,)]
    assert _rows(database_url, "SELECT count(*) FROM budget_journal") == [(0,)]


def test_round_trip_restores_patch_plus_later_journal(store: Store) -> None:
    entries = [_entry(1, "a", "0.1"), _entry(2, "b", "0.2"), _entry(3, "c", "0.000000000001")]
    store.write(entries[:2], [_snapshot(2, "0.3")], [], T0)
    store.write(entries[2:], [], [], T0)
    restored = store.load(DAY)
    # Both stores restore this service's share, kept exact with its rows in
    # the same transaction: nothing of the journal is read back.
    assert restored.patch is not None and restored.entries == ()
    assert restored.patch.daily_spend == Decimal("0.300000000001")
    assert (restored.patch.dispatches, restored.patch.cycle_count) == (3, 10)
    if store.shared:
        assert restored.others is not None and restored.others.spend == 0
    else:
        assert restored.others is None
    assert restored.max_seq == 3
    assert [e.cost.usd for e in store.journal(DAY)] == [
        Decimal("0.1"),
        Decimal("0.2"),
        entries[2].cost.usd,
    ]


def test_other_days_are_not_restored(store: Store) -> None:
    store.write([_entry(1, "a", "5", day="2026-11-30")], [_snapshot(1, "5", "2026-11-30")], [], T0)
    restored = store.load(DAY)
    assert restored.patch is None and restored.entries == ()
    assert restored.max_seq == 1  # seq keeps growing across days


def test_rewriting_a_batch_is_harmless(store: Store) -> None:
    batch = [_entry(1, "a", "1.5")]
    store.write(batch, [], [], T0)
    store.write(batch, [], [], T0)
    assert [e.seq for e in store.journal(DAY)] == [1]


def test_patch_upsert_keeps_created_at_and_last_snapshot_wins(
    database_url: str, store: Store
) -> None:
    # The costs go with the patches: the patch is the sum of the shares,
    # whatever the snapshot says of spend and dispatches.
    store.write([_entry(1, "a", "1")], [_snapshot(1, "1")], [], T0)
    later = T0 + timedelta(minutes=5)
    costs = [_entry(2, "b", "1"), _entry(3, "c", "1.5")]
    store.write(costs, [_snapshot(2, "2"), _snapshot(3, "3.5")], [], later)
    body = store.get_patch("budget", f"budget_{DAY}")
    assert body is not None
    if store.shared:
        # Which instance's share is what, for `verify`.
        assert body.pop("shares") == {
            store.instance: {"daily_spend": "3.5", "dispatches": 3, "seq": 3}
        }
    assert body == {
        "date": DAY,
        "daily_spend": "3.5",
        "daily_cap": "10.00",
        "cycle_count": 10,
        "dispatches": 3,
        "alerts_sent": [0.8],
        "seq": 3,
    }
    (created, updated) = _rows(
        database_url,
        f"SELECT created_at, updated_at FROM quilt_patches WHERE name = 'budget_{DAY}'",
    )[0]
    as_dt = [
        v if isinstance(v, datetime) else datetime.fromisoformat(v) for v in (created, updated)
    ]
    assert as_dt == [T0, later]


def test_nudge_row_is_written_once(database_url: str, store: Store) -> None:
    store.write([_entry(1, "a", "8.5")], [], [], T0)
    first = store.write([], [], [_alert()], T0)
    assert first.nudges == {f"budget_alert_{DAY}_80": "inserted"}
    again = store.write([], [], [_alert()], T0 + timedelta(hours=1))
    assert again.nudges == {f"budget_alert_{DAY}_80": "exists"} and again.inserted == set()
    body = store.get_patch("sibling_nudge", f"budget_alert_{DAY}_80")
    assert body == {
        "to": "AG Lu",
        "from": "budget_actor",
        "day": DAY,
        "threshold": 0.8,
        "daily_spend": "8.5",
        "daily_cap": "10.00",
        "created_at": T0.isoformat(),
    }
    assert store.load(DAY).alerts_sent == frozenset({Decimal("0.8")})


def test_fractional_percent_names_round_trip(store: Store) -> None:
    store.write([_entry(1, "a", "9.6")], [], [_alert("0.955")], T0)
    assert store.get_patch("sibling_nudge", f"budget_alert_{DAY}_95.5") is not None
    assert store.load(DAY).alerts_sent == frozenset({Decimal("0.955")})


def test_rows_it_does_not_own_are_left_alone(database_url: str, store: Store) -> None:
    foreign = [("note", "budget_2026-12-01", '{"x":1}'), ("sibling_nudge", "hello", '{"y":2}')]
    for type_, name, body in foreign:
        sql = (
            "INSERT INTO quilt_patches (type, name, body, created_at, updated_at) VALUES"
            f" ('{type_}', '{name}', '{body}', '2026-01-01T00:00:00+00:00',"
            " '2026-01-01T00:00:00+00:00')"
        )
        if database_url.startswith("sqlite"):
            with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
                conn.execute(sql)
        else:
            with psycopg.connect(database_url) as conn:
                conn.execute(sql)
    store.write([_entry(1, "a", "8")], [_snapshot(1, "1")], [_alert()], T0)
    assert store.load(DAY).alerts_sent == frozenset({Decimal("0.8")})
    assert store.get_patch("note", "budget_2026-12-01") == {"x": 1}
    assert store.get_patch("sibling_nudge", "hello") == {"y": 2}


def test_postgres_column_types_match_the_contract(pg_url: str) -> None:
    store = open_store(pg_url)
    store.open()
    store.close()
    types = dict(
        _rows(
            pg_url,
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'quilt_patches' AND table_schema = current_schema()",
        )
    )
    assert types == {
        "type": "text",
        "name": "text",
        "body": "jsonb",
        "created_at": "timestamp with time zone",
        "updated_at": "timestamp with time zone",
    }
    usd_type = _rows(
        pg_url,
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'budget_journal'"
        " AND column_name = 'usd' AND table_schema = current_schema()",
    )
    assert usd_type == [("numeric",)]


def test_unreachable_postgres_raises_store_error() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(StoreError, match="postgresql"):
        store.open()


def test_unknown_url_is_refused() -> None:
    with pytest.raises(StoreError, match="unsupported"):
        open_store("mysql://x")


def test_a_second_instance_on_one_sqlite_file_is_refused(sqlite_url: str) -> None:
    first = open_store(sqlite_url)
    first.open()
    second = open_store(sqlite_url)
    with pytest.raises(StoreError, match="in use by another budget-actor"):
        second.open()
    reader = open_store(sqlite_url)
    reader.open(create=False)  # audits and reports may read alongside
    reader.close()
    first.close()
    second.open()  # the lock went with the first
    second.close()


def test_a_second_instance_with_the_same_id_on_one_postgres_schema_is_refused(
    pg_url: str,
) -> None:
    first = open_store(pg_url, "one")
    first.open()
    other = open_store(pg_url, "two")
    other.open()  # another id shares the budget
    other.close()
    second = open_store(pg_url, "one")
    with pytest.raises(StoreError, match="in use by another budget-actor"):
        second.open()
    reader = open_store(pg_url)
    reader.open(create=False)  # audits and reports may read alongside
    reader.close()
    first.close()
    second.open()  # the lock went with the first one's connection
    second.close()


# -- PostgreSQL: instances sharing one budget ---------------------------------


@pytest.fixture
def pair(pg_url: str) -> Any:
    """Two instances' stores on one schema."""
    a, b = PostgresStore(pg_url, "a"), PostgresStore(pg_url, "b")
    a.open()
    b.open()
    yield a, b
    a.close()
    b.close()


def _share(url: str, instance: str) -> tuple[Any, ...]:
    found = _rows(
        url,
        "SELECT spend, dispatches FROM budget_shares"
        f" WHERE day = '{DAY}' AND instance = '{instance}'",
    )
    return found[0] if found else (0, 0)


def test_an_id_counted_by_another_instance_is_reported_not_counted(
    pg_url: str, pair: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = pair
    assert a.write([_entry(5, "x", "1")], [], [], T0).duplicates == {}
    result = b.write([_entry(9, "x", "2"), _entry(10, "y", "0.5")], [], [], T0)
    assert result.duplicates == {9: (5, DAY)}
    assert _share(pg_url, "a") == (Decimal("1"), 1)
    assert _share(pg_url, "b") == (Decimal("0.5"), 1)
    assert b.others(DAY).spend == Decimal("1") and a.others(DAY).spend == Decimal("0.5")


def test_a_retried_batch_is_neither_a_duplicate_nor_counted_twice(
    pg_url: str, pair: tuple[PostgresStore, PostgresStore]
) -> None:
    a, _b = pair
    batch = [_entry(1, "x", "1"), _entry(2, "y", "2")]
    a.write(batch, [], [], T0)
    assert a.write(batch, [], [], T0).duplicates == {}
    assert _share(pg_url, "a") == (Decimal("3"), 2)


def test_large_batches_go_through_copy_and_a_held_id_falls_back_row_by_row(
    pg_url: str, pair: tuple[PostgresStore, PostgresStore]
) -> None:
    """Batches of COPY_MIN_ROWS or more rows go in through COPY: same rows,
    same share, reservations settled. One whose COPY meets an id held by
    another instance is redone row by row (that id reported, the rest
    counted), and the next batches skip COPY for a while."""
    a, b = pair
    n = COPY_MIN_ROWS
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO budget_reservations (day, dispatch_id, instance, estimate, expires_at)"
            " VALUES (%s, 'big-7', 'b', 1, now() + interval '1 hour')",
            (DAY,),
        )
    big = [_entry(i, f"big-{i}", "0.25") for i in range(1, n + 1)]
    assert b.write(big, [], [], T0).duplicates == {}
    assert b._copy_paused == 0  # COPY took it whole
    assert _share(pg_url, "b") == (Decimal("0.25") * n, n)
    assert _rows(pg_url, "SELECT count(*) FROM budget_reservations") == [(0,)]
    assert a.write([_entry(500, "held", "3")], [], [], T0).duplicates == {}
    mixed = [_entry(1000 + i, f"new-{i}", "1") for i in range(n - 1)]
    mixed.insert(n // 2, _entry(2000, "held", "5"))
    assert b.write(mixed, [], [], T0).duplicates == {2000: (500, DAY)}
    assert b._copy_paused == COPY_PAUSE_BATCHES
    assert _share(pg_url, "b") == (Decimal("0.25") * n + (n - 1), 2 * n - 1)
    after = [_entry(3000 + i, f"after-{i}", "1") for i in range(n)]
    assert b.write(after, [], [], T0).duplicates == {}
    assert b._copy_paused == COPY_PAUSE_BATCHES - 1  # row by row, counting down
    assert _share(pg_url, "b") == (Decimal("0.25") * n + (2 * n - 1), 3 * n - 1)
    rows = {e.cost.dispatch_id: e for e in b.journal(DAY)}
    assert rows["big-7"].cost == Cost("big-7", Decimal("0.25"), model="m", agent="a")
    assert "held" in rows and rows["held"].seq == 500  # a's row, not b's


def test_both_instances_may_use_the_same_seq(pair: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = pair
    a.write([_entry(1, "x", "1")], [], [], T0)
    assert b.write([_entry(1, "y", "2")], [], [], T0).duplicates == {}
    assert sorted(e.cost.dispatch_id for e in a.journal(DAY)) == ["x", "y"]


def test_the_patch_is_the_sum_of_every_share(pair: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = pair
    a.write([_entry(1, "x", "1.25")], [_snapshot(1, "1.25", cycles=3)], [], T0)
    b.write([_entry(1, "y", "2.5"), _entry(2, "z", "0.01")], [], [], T0)
    b.write([], [_snapshot(2, "2.51", cycles=4)], [], T0)  # b's own figures are not the patch
    body = b.get_patch("budget", f"budget_{DAY}")
    assert body is not None
    assert (body["daily_spend"], body["dispatches"], body["cycle_count"]) == ("3.76", 3, 7)


def test_a_nudge_needs_the_shared_spend_to_reach_its_threshold(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    a.write([_entry(1, "x", "5")], [], [], T0)
    assert b.write([], [], [_alert()], T0).nudges == {f"budget_alert_{DAY}_80": "premature"}
    b.write([_entry(1, "y", "3")], [], [], T0)  # 8.00 of 10: 80% reached, all instances
    assert b.write([], [], [_alert()], T0).inserted == {f"budget_alert_{DAY}_80"}
    assert a.write([], [], [_alert()], T0).nudges == {f"budget_alert_{DAY}_80": "exists"}


def test_admission_is_decided_against_every_instance(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    cap = Decimal("10")
    a.write([_entry(1, "spent", "3")], [], [], T0)
    first, others = b.admit(DAY, "d1", Decimal("5"), cap, 600)
    assert (first.allowed, first.remaining) == (True, Decimal("2"))
    assert others.reserved == Decimal("5") and others.spend == Decimal("3")
    refused, _ = a.admit(DAY, "d2", Decimal("2.01"), cap, 600)
    assert not refused.allowed and refused.remaining == Decimal("2")
    assert "all instances" in (refused.reason or "")
    # d1's cost settles its reservation, on any instance, at its real cost.
    a.write([_entry(2, "d1", "4")], [], [], T0)
    fits, _ = a.admit(DAY, "d2", Decimal("3"), cap, 600)
    assert (fits.allowed, fits.remaining) == (True, Decimal("0"))
    counted, _ = b.admit(DAY, "d1", Decimal("0.01"), cap, 600)
    assert not counted.allowed and "already counted" in (counted.reason or "")


def test_an_expired_reservation_frees_the_shared_cap(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    import time

    a, b = pair
    held, _ = a.admit(DAY, "d1", Decimal("9"), Decimal("10"), 0.2)
    assert held.allowed
    refused, _ = b.admit(DAY, "d2", Decimal("9"), Decimal("10"), 0.2)
    assert not refused.allowed
    time.sleep(0.3)
    later, others = b.admit(DAY, "d2", Decimal("9"), Decimal("10"), 600)
    assert later.allowed and others.reserved == Decimal("9")


def test_a_journal_from_before_sharing_is_migrated_without_loss(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE budget_journal (seq bigint PRIMARY KEY, day text NOT NULL,"
            " dispatch_id text NOT NULL, usd numeric NOT NULL, recorded_at timestamptz NOT NULL,"
            " model text, agent text, input_tokens bigint, output_tokens bigint,"
            " UNIQUE (day, dispatch_id))"
        )
        conn.execute(
            "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at) VALUES"
            f" (1, '{DAY}', 'old1', 0.5, now()), (2, '{DAY}', 'old2', 0.25, now())"
        )
    store = open_store(pg_url, "new")
    store.open()
    try:
        assert store.others(DAY).spend == Decimal("0.75")
        assert store.write([_entry(1, "old1", "9")], [], [], T0).duplicates == {1: (1, DAY)}
        assert store.write([_entry(2, "fresh", "1")], [], [], T0).duplicates == {}
        assert store.load(DAY).max_seq == 2
    finally:
        store.close()


async def test_a_write_aborted_as_a_deadlock_is_run_again(pg_url: str) -> None:
    """A lock cycle with another transaction: PostgreSQL aborts the store's
    write (the other side waits longer before it checks for deadlocks); the
    store runs it again instead of reporting an outage."""
    import trio

    store = PostgresStore(pg_url, "a")
    store.open()
    other = psycopg.connect(pg_url)
    try:
        other.execute("SET deadlock_timeout = '30s'")
        hold = (
            "INSERT INTO budget_journal (instance, seq, day, dispatch_id, usd, recorded_at)"
            " VALUES ('other', %s, %s, %s, 1, now())"
        )
        other.execute(hold, (1, DAY, "b"))
        async with trio.open_nursery() as nursery:
            done: list[Any] = []

            async def write() -> None:
                batch = [_entry(1, "a", "1"), _entry(2, "b", "2")]
                done.append(await trio.to_thread.run_sync(store.write, batch, [], [], T0))

            nursery.start_soon(write)
            await trio.sleep(0.3)  # the write holds "a" and waits for "b"
            # Now "other" waits for "a": a cycle. The store's session finds
            # it after 1 s and aborts; "other" then gets "a" and gives up.
            await trio.to_thread.run_sync(other.execute, hold, (2, DAY, "a"))
            await trio.to_thread.run_sync(other.rollback)
        assert done and done[0].duplicates == {}
        assert _share(pg_url, "a") == (Decimal("3"), 2)
    finally:
        other.close()
        store.close()


def test_a_cost_numbered_twice_is_still_written(
    pg_url: str, pair: tuple[PostgresStore, PostgresStore]
) -> None:
    """A dead instance's spill file, adopted by an instance that has used
    the same numbers since: the costs differ, so both must count."""
    a, _b = pair
    a.write([_entry(7, "own", "1")], [], [], T0)
    assert a.write([_entry(7, "adopted", "2")], [], [], T0).duplicates == {}
    assert _share(pg_url, "a") == (Decimal("3"), 2)
    assert a.write([_entry(7, "adopted", "2")], [], [], T0).duplicates == {}  # a retry
    assert _share(pg_url, "a") == (Decimal("3"), 2)


def test_admission_holds_on_a_server_whose_default_is_repeatable_read(pg_url: str) -> None:
    """Each admission must read after taking its lock; under REPEATABLE READ
    the snapshot would predate the wait, and concurrent admissions would miss
    each other's reservations."""
    import threading

    assert "options=" in pg_url  # the test's own schema: extend its options
    url = pg_url + "%20-cdefault_transaction_isolation%3Drepeatable%5C%20read"
    stores = [PostgresStore(url, f"i{k}") for k in range(8)]
    for store in stores:
        store.open()
    allowed: list[bool] = []

    def admit(store: PostgresStore, k: int) -> None:
        for i in range(10):
            answer, _ = store.admit(DAY, f"d{k}-{i}", Decimal("1"), Decimal("10"), 600)
            allowed.append(answer.allowed)

    try:
        threads = [threading.Thread(target=admit, args=(s, k)) for k, s in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        level = _rows(url, "SHOW default_transaction_isolation")
        assert level == [("repeatable read",)]  # the setting did apply...
        assert _rows(url, "SELECT current_schema()") == _rows(pg_url, "SELECT current_schema()")
    finally:
        for store in stores:
            store.close()
    assert allowed.count(True) == 10


def test_an_older_single_instance_service_and_this_version_exclude_each_other(
    pg_url: str,
) -> None:
    old = psycopg.connect(pg_url, autocommit=True)
    try:
        # What the version before shared budgets held for as long as it ran.
        old.execute("SELECT pg_advisory_lock(hashtext('budget_actor:' || current_schema()))")
        new = PostgresStore(pg_url, "new")
        with pytest.raises(StoreError, match="older budget-actor"):
            new.open()
        old.execute("SELECT pg_advisory_unlock_all()")
        new.open()
        row = old.execute(
            "SELECT pg_try_advisory_lock(hashtext('budget_actor:' || current_schema()))"
        ).fetchone()
        assert row == (False,)  # and an older one cannot start beside it
        new.close()
    finally:
        old.close()


def test_rows_written_without_their_share_join_it_at_restore(
    database_url: str, store: Store
) -> None:
    """Journal rows put there by hand (or by a version that kept no shares)
    are restored, and added to the share, so the patch and the nudge guard
    see them too."""
    store.write([_entry(1, "a", "0.5")], [], [], T0)
    instance = "" if not store.shared else f"'{store.instance}'"
    columns = "seq, day, dispatch_id, usd, recorded_at"
    values = f"2, '{DAY}', 'by-hand', '7.5', '{T0.isoformat()}'"
    if store.shared:
        columns, values = f"instance, {columns}", f"{instance}, {values}"
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.execute(f"INSERT INTO budget_journal ({columns}) VALUES ({values})")
    else:
        with psycopg.connect(database_url) as conn:
            conn.execute(f"INSERT INTO budget_journal ({columns}) VALUES ({values})")
    restored = store.load(DAY)
    assert [e.cost.dispatch_id for e in restored.entries] == ["by-hand"]
    assert restored.patch is not None and restored.patch.daily_spend == Decimal("0.5")
    assert store.load(DAY).patch.daily_spend == Decimal("8")  # type: ignore[union-attr]
    assert store.write([], [], [_alert()], T0).inserted == {f"budget_alert_{DAY}_80"}
