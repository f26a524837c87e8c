"""PostgreSQL store, through psycopg's synchronous API (run in worker threads)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from ._store import Store, StoreError

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

_SCHEMA = (
    (
        "quilt_patches",
        "CREATE TABLE IF NOT EXISTS quilt_patches (type text NOT NULL, name text NOT NULL,"
        " body jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
        " updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (type, name))",
    ),
    (
        "budget_journal",
        "CREATE TABLE IF NOT EXISTS budget_journal (seq bigint PRIMARY KEY, day text NOT NULL,"
        " dispatch_id text NOT NULL, usd numeric NOT NULL, recorded_at timestamptz NOT NULL,"
        " model text, agent text, input_tokens bigint, output_tokens bigint,"
        " UNIQUE (day, dispatch_id))",
    ),
)


class PostgresStore(Store):
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.location = url

    def _connect(self) -> Any:
        # autocommit: the base class issues BEGIN/COMMIT itself, the same SQL
        # for both drivers.
        conn = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            tcp_user_timeout=TCP_USER_TIMEOUT_MS,
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        if not self._read_only:
            self._take_instance_lock(conn)
        return conn

    def _take_instance_lock(self, conn: Any) -> None:
        """One service per schema, until instances can share a budget.

        Two services journaling into one schema would each number their costs
        from the same sequence, and the second's rows would be dropped as
        conflicts. A session-level advisory lock, keyed by the schema, refuses
        the second with a clear error; it goes with the connection (and with
        the process, however it dies), and is taken again on every reconnect.
        """
        for attempt in range(LOCK_ATTEMPTS):
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtext('budget_actor:' || current_schema()))"
            ).fetchone()
            if row and row[0]:
                return
            # A predecessor killed a moment ago holds the lock until its
            # server process notices the closed socket: give it that moment.
            if attempt + 1 < LOCK_ATTEMPTS:
                time.sleep(LOCK_RETRY_S)
        conn.close()
        raise StoreError(
            "postgresql: this schema is in use by another budget-actor (advisory lock held);"
            " one instance per schema"
        )

    def _schema(self) -> Sequence[tuple[str, str]]:
        return _SCHEMA

    def _table_exists(self, cur: Any, table: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        exists: bool = cur.fetchone()[0]
        return exists

    def _json_marker(self) -> str:
        return "%s::jsonb"

    def _journal_insert(self) -> str:
        return (
            "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at, model, agent,"
            " input_tokens, output_tokens) SELECT seq, day, dispatch_id, usd, at, model, agent,"
            " input_tokens, output_tokens FROM jsonb_to_recordset(%s::jsonb) AS r(seq bigint,"
            " day text, dispatch_id text, usd numeric, at timestamptz, model text, agent text,"
            " input_tokens bigint, output_tokens bigint) ON CONFLICT DO NOTHING"
        )

    def _time_param(self, moment: datetime) -> Any:
        return moment

    def _read_body(self, value: Any) -> dict[str, Any]:
        body: dict[str, Any] = value
        return body

    def _read_time(self, value: Any) -> datetime:
        moment: datetime = value
        return moment
