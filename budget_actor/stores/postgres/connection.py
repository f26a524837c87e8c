"""PostgreSQL: the connection, the instance lock, and the schema with its migration."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from ...core.records import PATCH_TYPE
from ..store import StoreError

# A dead server must surface as an error quickly, so that health turns
# "degraded" and costs spill, instead of hanging the persister's worker thread.
CONNECT_TIMEOUT_S = 3
# A server that vanishes mid-query without a TCP reset (a partition) would
# otherwise hold a write for the kernel's retransmission timeout (~15 min):
# give up on unacknowledged data after 10 s, and probe idle connections.
TCP_USER_TIMEOUT_MS = 10_000
# The instance lock is retried for about 2 s before a second service is refused.
LOCK_ATTEMPTS = 10
LOCK_RETRY_S = 0.2

SCHEMA = (
    (
        "quilt_patches",
        "CREATE TABLE IF NOT EXISTS quilt_patches (type text NOT NULL, name text NOT NULL,"
        " body jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
        " updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (type, name))",
    ),
    (
        # (day, dispatch_id) is a key across all instances, and with it the
        # two keys of the dedupe window (indexes, see Store._indexes): global
        # dedupe, and no other way for a row to be refused. Each instance
        # numbers its own costs (seq); a number is not a key, so a row
        # numbered twice (a dead instance's spill file adopted by one that
        # reused its numbers) is still written, never silently dropped.
        "budget_journal",
        "CREATE TABLE IF NOT EXISTS budget_journal (instance text NOT NULL DEFAULT '',"
        " seq bigint NOT NULL, day text NOT NULL,"
        " dispatch_id text NOT NULL, usd numeric NOT NULL, recorded_at timestamptz NOT NULL,"
        " model text, agent text, input_tokens bigint, output_tokens bigint,"
        " UNIQUE (day, dispatch_id))",
    ),
    (
        # One row per day and instance: the sum of that instance's journal
        # rows of the day, kept in the same transaction as the rows, so
        # summing a handful of shares gives the global spend exactly.
        "budget_shares",
        "CREATE TABLE IF NOT EXISTS budget_shares (day text NOT NULL, instance text NOT NULL,"
        " spend numeric NOT NULL DEFAULT 0, dispatches bigint NOT NULL DEFAULT 0,"
        " cycles bigint NOT NULL DEFAULT 0, seq bigint NOT NULL DEFAULT 0,"
        " updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (day, instance))",
    ),
    (
        # Admitted estimates not yet settled; a cost's journal row deletes
        # its reservation in the same transaction.
        "budget_reservations",
        "CREATE TABLE IF NOT EXISTS budget_reservations (day text NOT NULL,"
        " dispatch_id text NOT NULL, instance text NOT NULL, estimate numeric NOT NULL,"
        " expires_at timestamptz NOT NULL, renewals integer NOT NULL DEFAULT 0,"
        " PRIMARY KEY (day, dispatch_id))",
    ),
    (
        # Alert webhook deliveries (see Store: alert webhooks), shared by the
        # instances: whichever is configured with a webhook may send its rows.
        "budget_webhooks",
        "CREATE TABLE IF NOT EXISTS budget_webhooks (target text NOT NULL, name text NOT NULL,"
        " body text NOT NULL, created_at timestamptz NOT NULL, next_at timestamptz NOT NULL,"
        " attempts integer NOT NULL DEFAULT 0, claimed_by text, delivered_at timestamptz,"
        " last_error text, PRIMARY KEY (target, name))",
    ),
)


def connect(url: str, *, instance: str | None, read_only: bool) -> Any:
    """A connection in autocommit mode (the store issues BEGIN/COMMIT itself,
    the same SQL as SQLite's), holding ``instance``'s lock unless ``read_only``.
    Raises psycopg's errors, or :class:`StoreError` if the instance is taken."""
    conn = psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        tcp_user_timeout=TCP_USER_TIMEOUT_MS,
        keepalives=1,
        keepalives_idle=30,
        keepalives_interval=10,
        keepalives_count=3,
    )
    if not read_only:
        _take_instance_lock(conn, instance)
    return conn


def _take_instance_lock(conn: Any, instance: str | None) -> None:
    """One live service per instance id and schema.

    Two services with one id would number their costs from the same
    sequence and drop each other's rows as conflicts. A session-level
    advisory lock keyed by schema and instance id refuses the second with
    a clear error; it goes with the connection (and with the process,
    however it dies), and is taken again on every reconnect.
    """
    # The schema-wide key of the versions that served one instance per
    # schema: they hold it exclusively, every sharing instance holds it
    # shared, so neither kind starts beside the other (an old instance's
    # costs would miss the shares, and so the global spend).
    _try_lock(
        conn,
        "SELECT pg_try_advisory_lock_shared(hashtext('budget_actor:' || current_schema()))",
        (),
        "postgresql: this schema is in use by an older budget-actor that serves one"
        " instance per schema; stop it before starting this version",
    )
    _try_lock(
        conn,
        "SELECT pg_try_advisory_lock(hashtext('budget_actor:' || current_schema()), hashtext(%s))",
        (instance,),
        f"postgresql: instance id {instance!r} is in use by another budget-actor"
        " on this schema (advisory lock held); give each instance its own --instance-id",
    )


def _try_lock(conn: Any, query: str, params: tuple[object, ...], refusal: str) -> None:
    for attempt in range(LOCK_ATTEMPTS):
        row = conn.execute(query, params).fetchone()
        if row and row[0]:
            return
        # A predecessor killed a moment ago holds the lock until its
        # server process notices the closed socket: give it that moment.
        if attempt + 1 < LOCK_ATTEMPTS:
            time.sleep(LOCK_RETRY_S)
    conn.close()
    raise StoreError(refusal)


def is_conflict(exc: Exception) -> bool:
    """True for an abort that only says "run the transaction again"."""
    # Instances writing the same ids, or admitting while costs settle
    # reservations, can meet in a lock cycle; PostgreSQL aborts one.
    return isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)


def lock_schema(cur: Any) -> None:
    """Instances starting together must not race to create or migrate."""
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext('budget_actor_schema:' || current_schema()))"
    )


def is_unique_violation(exc: Exception) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation)


def table_exists(cur: Any, table: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
    exists: bool = cur.fetchone()[0]
    return exists


def migrate(cur: Any) -> None:
    """Bring a journal from before instances shared a budget up to date, once:
    its rows become the share of instance '' (the empty id), so nothing it
    counted is lost. Reservations from before renewals were counted get the
    count (0), once."""
    cur.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'budget_reservations' AND column_name = 'renewals'"
    )
    if cur.fetchone() is None:
        cur.execute(
            "ALTER TABLE budget_reservations ADD COLUMN renewals integer NOT NULL DEFAULT 0"
        )
    cur.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'budget_journal' AND column_name = 'instance'"
    )
    if cur.fetchone() is not None:
        return
    cur.execute("ALTER TABLE budget_journal ADD COLUMN instance text NOT NULL DEFAULT ''")
    # seq was the key; (day, dispatch_id), unique already, is the key now.
    cur.execute("ALTER TABLE budget_journal DROP CONSTRAINT IF EXISTS budget_journal_pkey")
    cur.execute(
        "INSERT INTO budget_shares (day, instance, spend, dispatches, seq)"
        " SELECT day, '', sum(usd), count(*), max(seq) FROM budget_journal GROUP BY day"
        " ON CONFLICT DO NOTHING"
    )
    cur.execute(
        "UPDATE budget_shares s SET cycles = (p.body->>'cycle_count')::bigint"
        " FROM quilt_patches p WHERE p.type = %s AND p.name = 'budget_' || s.day"
        " AND s.instance = ''",
        (PATCH_TYPE,),
    )
