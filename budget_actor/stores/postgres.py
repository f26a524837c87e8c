"""PostgreSQL store, through psycopg's synchronous API (run in worker threads)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from ..core.audit import ShareCheck
from ..core.money import MONEY_CONTEXT, add, sub
from ..core.records import (
    NUDGE_TYPE,
    PATCH_TYPE,
    Alert,
    Others,
    Restored,
    Snapshot,
    WriteResult,
)
from ..core.views import Admission
from .store import JournalBatch, Store, StoreError

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
        # (day, dispatch_id) is the one key, across all instances: global
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
        " expires_at timestamptz NOT NULL, PRIMARY KEY (day, dispatch_id))",
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

# Journal rows of one batch, this instance's share of them, and the settling
# of their reservations, in one statement. Only rows actually inserted count
# in the share, so a retried batch (its rows already there) adds nothing, and
# a row that another instance counted first (same day and dispatch_id) is
# left out: the statement returns the rows it did not insert. Rows go in
# (day, dispatch_id) order: two instances inserting the same ids then wait
# for each other in one order, never in a cycle (a deadlock).
_JOURNAL_INSERT = """
WITH r AS (
    SELECT r.seq, r.day, r.at, c.* FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS r(seq bigint, day text, at timestamptz, cost jsonb),
        jsonb_to_record(r.cost) AS c(dispatch_id text, usd numeric, model text,
            input_tokens bigint, output_tokens bigint, agent text)
), ins AS (
    INSERT INTO budget_journal (instance, seq, day, recorded_at, dispatch_id, usd, model,
        input_tokens, output_tokens, agent)
    SELECT %(instance)s, seq, day, at, dispatch_id, usd, model, input_tokens,
        output_tokens, agent FROM r ORDER BY day, dispatch_id
    ON CONFLICT DO NOTHING
    RETURNING seq, day, dispatch_id, usd
), share AS (
    INSERT INTO budget_shares AS s (day, instance, spend, dispatches, seq)
    SELECT day, %(instance)s, sum(usd), count(*), max(seq) FROM ins GROUP BY day
    ON CONFLICT (day, instance) DO UPDATE SET spend = s.spend + excluded.spend,
        dispatches = s.dispatches + excluded.dispatches,
        seq = GREATEST(s.seq, excluded.seq), updated_at = now()
), settled AS (
    DELETE FROM budget_reservations b USING ins
    WHERE b.day = ins.day AND b.dispatch_id = ins.dispatch_id
)
SELECT r.seq, r.day, r.dispatch_id FROM r
WHERE (r.day, r.dispatch_id) NOT IN (SELECT day, dispatch_id FROM ins)
"""

_OTHERS = """
SELECT
    (SELECT COALESCE(sum(spend), 0) FROM budget_shares WHERE day = %(day)s
        AND instance <> %(instance)s),
    (SELECT COALESCE(sum(dispatches), 0) FROM budget_shares WHERE day = %(day)s
        AND instance <> %(instance)s),
    (SELECT COALESCE(sum(cycles), 0) FROM budget_shares WHERE day = %(day)s
        AND instance <> %(instance)s),
    (SELECT count(*) FROM budget_shares WHERE day = %(day)s AND instance <> %(instance)s),
    (SELECT COALESCE(sum(estimate), 0) FROM budget_reservations WHERE day = %(day)s
        AND expires_at > now())
"""


class PostgresStore(Store):
    """PostgreSQL, shared by every instance that uses the same schema.

    Each instance journals its own costs under its instance id, keeps its
    share of each day in ``budget_shares`` in the same transaction, and reads
    the others' shares to see the global spend (see
    :mod:`budget_actor._shared`). The budget patch is always the sum of all
    shares; a nudge row is written only if the shared spend in the store has
    reached its threshold.
    """

    kind = "postgresql"
    shared = True
    # Admission, the patch sum and the nudge guard each read in a statement
    # after taking a lock, and must see what committed before they got it:
    # a fresh snapshot per statement. A server whose default is REPEATABLE
    # READ would take the snapshot before the lock wait and let two
    # admissions miss each other's reservations.
    _BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"

    def __init__(self, url: str, instance: str | None = None) -> None:
        super().__init__()
        self.url = url
        self.location = url
        self.instance = instance if instance is not None else default_instance_id()

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

    def shared_budget(self) -> PostgresStore:
        """A second, read-only connection to the same store for the same
        instance (the coordinator's: sync queries and admissions never wait
        behind the persister's writes)."""
        other = PostgresStore(self.url, self.instance)
        other._read_only = True
        return other

    def companion(self) -> PostgresStore:
        """Another connection for this instance, for a child that must not
        wait behind the persister (the alert webhooks). It takes no instance
        lock (the service that made it holds that); it may write."""
        other = PostgresStore(self.url, self.instance)
        other._read_only = True  # here: "take no instance lock"
        return other

    def spill_path(self) -> Path:
        """``budget-<hash>.spill`` in the working directory, the hash of the
        host, port, database and schema, so that services on different
        databases never share one."""
        # Host, port and database only: rotating a password or changing a
        # connection option must not orphan a spill file of acknowledged costs.
        parts = urlsplit(self.url)
        where = f"{parts.hostname}:{parts.port}{parts.path}?{_search_path(parts.query)}"
        digest = hashlib.sha256(where.encode()).hexdigest()[:12]
        return Path(f"budget-{digest}.spill")

    def _take_instance_lock(self, conn: Any) -> None:
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
        self._try_lock(
            conn,
            "SELECT pg_try_advisory_lock_shared(hashtext('budget_actor:' || current_schema()))",
            (),
            "postgresql: this schema is in use by an older budget-actor that serves one"
            " instance per schema; stop it before starting this version",
        )
        self._try_lock(
            conn,
            "SELECT pg_try_advisory_lock(hashtext('budget_actor:' || current_schema()),"
            " hashtext(%s))",
            (self.instance,),
            f"postgresql: instance id {self.instance!r} is in use by another budget-actor"
            " on this schema (advisory lock held); give each instance its own --instance-id",
        )

    def _try_lock(self, conn: Any, query: str, params: tuple[object, ...], refusal: str) -> None:
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

    def _schema(self) -> Sequence[tuple[str, str]]:
        return _SCHEMA

    def _conflict(self, exc: Exception) -> bool:
        # Instances writing the same ids, or admitting while costs settle
        # reservations, can meet in a lock cycle; PostgreSQL aborts one.
        return isinstance(
            exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure
        )

    def _create(self, cur: Any) -> None:
        # Instances starting together must not race to create or migrate.
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext('budget_actor_schema:' || current_schema()))"
        )
        super()._create(cur)
        cur.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = 'budget_journal' AND column_name = 'instance'"
        )
        if cur.fetchone() is None:
            self._migrate(cur)

    def _migrate(self, cur: Any) -> None:
        """A journal from before instances shared a budget: its rows become the
        share of instance '' (the empty id), so nothing it counted is lost."""
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

    def _table_exists(self, cur: Any, table: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        exists: bool = cur.fetchone()[0]
        return exists

    def _json_marker(self) -> str:
        return "%s::jsonb"

    def _journal_insert(self) -> str:
        return _JOURNAL_INSERT

    def _insert_journal(self, cur: Any, batch: JournalBatch, result: WriteResult) -> None:
        cur.execute(_JOURNAL_INSERT, {"rows": batch.json, "instance": self.instance})
        missing = cur.fetchall()
        if not missing:
            return
        # Not inserted: either this very row is there already (a retried
        # batch) or another row holds its day and dispatch_id. A new
        # statement sees rows committed while the insert waited on them.
        cur.execute(
            "SELECT j.day, j.dispatch_id, j.instance, j.seq FROM budget_journal j"
            " JOIN unnest(%s::text[], %s::text[]) AS m(day, dispatch_id)"
            " ON j.day = m.day AND j.dispatch_id = m.dispatch_id",
            ([r[1] for r in missing], [r[2] for r in missing]),
        )
        holders = {(r[0], r[1]): (r[2], int(r[3])) for r in cur.fetchall()}
        for seq, day, dispatch_id in missing:
            holder = holders.get((day, dispatch_id))
            if holder is not None and holder != (self.instance, int(seq)):
                result.duplicates[int(seq)] = holder[1]

    def _upsert_patch(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
        """The patch of ``snap.day`` as the sum of every instance's share.

        ``snap`` contributes this instance's cycle count (to its share) and
        the cap; spend and dispatches come from the shares, exact, under a
        per-day lock so that patches are written in the order they were summed.
        """
        cur.execute(
            "INSERT INTO budget_shares AS s (day, instance, cycles) VALUES (%s, %s, %s)"
            " ON CONFLICT (day, instance)"
            " DO UPDATE SET cycles = GREATEST(s.cycles, excluded.cycles)",
            (snap.day, self.instance, snap.cycle_count),
        )
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext('budget_patch:' || current_schema()),"
            " hashtext(%s))",
            (snap.day,),
        )
        cur.execute(
            "SELECT instance, spend, dispatches, cycles, seq FROM budget_shares WHERE day = %s",
            (snap.day,),
        )
        shares: dict[str, tuple[Decimal, int, int]] = {}
        spend, dispatches, cycles = Decimal(0), 0, 0
        for name, share_spend, share_dispatches, share_cycles, share_seq in cur.fetchall():
            shares[str(name)] = (Decimal(str(share_spend)), int(share_dispatches), int(share_seq))
            spend = add(spend, Decimal(str(share_spend)))
            dispatches += int(share_dispatches)
            cycles += int(share_cycles)
        sent = set(snap.alerts_sent) | self._sent(cur, snap.day)[0]
        total = Snapshot(
            day=snap.day,
            daily_spend=spend,
            daily_cap=snap.daily_cap,
            cycle_count=cycles,
            dispatches=dispatches,
            alerts_sent=tuple(sorted(sent)),
            seq=max((seq for _, _, seq in shares.values()), default=0),
            shares=shares,
        )
        super()._upsert_patch(cur, total, stamp)

    def _insert_nudge(self, cur: Any, alert: Alert, stamp: Any) -> str:
        """Insert the nudge row, but a threshold's only if the shared spend in
        the store has reached it: an instance's view can run ahead by a cost
        that turns out to be another instance's duplicate."""
        floor = MONEY_CONTEXT.multiply(alert.threshold, alert.daily_cap)
        cur.execute(
            "INSERT INTO quilt_patches (type, name, body, created_at, updated_at)"
            " SELECT %s, %s, %s::jsonb, %s, %s WHERE %s OR (SELECT COALESCE(sum(spend), 0)"
            " FROM budget_shares WHERE day = %s) >= %s ON CONFLICT (type, name) DO NOTHING",
            (
                NUDGE_TYPE,
                alert.nudge_name,
                self._json_param(alert.body()),
                stamp,
                stamp,
                alert.kind == "forecast",
                alert.day,
                floor,
            ),
        )
        if cur.rowcount == 1:
            return "inserted"
        cur.execute(
            "SELECT 1 FROM quilt_patches WHERE type = %s AND name = %s",
            (NUDGE_TYPE, alert.nudge_name),
        )
        return "exists" if cur.fetchone() is not None else "premature"

    def _load(self, cur: Any, day: str) -> Restored:
        """This instance's own share of ``day`` (from its share row and its
        journal rows after it) plus the others' totals; dedupe ids and sent
        alerts are global."""
        cur.execute(
            "SELECT spend, dispatches, cycles, seq FROM budget_shares"
            " WHERE day = %s AND instance = %s",
            (day, self.instance),
        )
        row = cur.fetchone()
        own = None
        if row is not None:
            own = Snapshot(
                day=day,
                daily_spend=Decimal(str(row[0])),
                daily_cap=Decimal(0),  # not used: the cap comes from the configuration
                cycle_count=int(row[2]),
                dispatches=int(row[1]),
                alerts_sent=(),
                seq=int(row[3]),
            )
        entries = self._entries(cur, day, own.seq if own else -1, self.instance)
        return self._restored(cur, day, own, entries, self._others(cur, day))

    def _max_seq(self, cur: Any) -> int:
        # seq is not a key on PostgreSQL (no index to read the maximum from);
        # every share row holds its instance's highest seq of the day.
        cur.execute("SELECT COALESCE(MAX(seq), 0) FROM budget_shares")
        return int(cur.fetchone()[0])

    def others(self, day: str) -> Others:
        result: Others = self._run(lambda cur: self._others(cur, day))
        return result

    def _others(self, cur: Any, day: str) -> Others:
        cur.execute(_OTHERS, {"day": day, "instance": self.instance})
        spend, dispatches, cycles, instances, reserved = cur.fetchone()
        return Others(
            day=day,
            spend=Decimal(str(spend)),
            dispatches=int(dispatches),
            cycles=int(cycles),
            instances=int(instances),
            reserved=Decimal(str(reserved)),
        )

    def admit(
        self, day: str, dispatch_id: str, estimate: Decimal, cap: Decimal, ttl_s: float
    ) -> tuple[Admission, Others]:
        """Reserve ``estimate`` against the global cap if it fits (see
        :meth:`budget_actor._ledger.Ledger.admit` for the rules, which are the
        same), and return the answer with the others' fresh totals.

        Admissions of one day are serialised by an advisory transaction lock,
        and each reads the spend (sum of shares) and the live reservations in
        one snapshot: a cost's journal row replaces its reservation in one
        transaction, so every admitted estimate is counted exactly once, as
        reserved or as spent. Raises :class:`StoreError`.
        """
        result: tuple[Admission, Others] = self._run(
            lambda cur: self._admit(cur, day, dispatch_id, estimate, cap, ttl_s)
        )
        return result

    def _admit(
        self,
        cur: Any,
        day: str,
        dispatch_id: str,
        estimate: Decimal,
        cap: Decimal,
        ttl_s: float,
    ) -> tuple[Admission, Others]:
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext('budget_admit:' || current_schema()),"
            " hashtext(%s))",
            (day,),
        )
        cur.execute("DELETE FROM budget_reservations WHERE expires_at <= now()")
        cur.execute(
            "SELECT (SELECT COALESCE(sum(spend), 0) FROM budget_shares WHERE day = %(day)s),"
            " (SELECT COALESCE(sum(estimate), 0) FROM budget_reservations"
            "   WHERE day = %(day)s AND dispatch_id <> %(id)s),"
            " (SELECT estimate FROM budget_reservations WHERE day = %(day)s"
            "   AND dispatch_id = %(id)s),"
            " EXISTS (SELECT 1 FROM budget_journal WHERE day = %(day)s AND dispatch_id = %(id)s)",
            {"day": day, "id": dispatch_id},
        )
        spent, reserved, previous, counted = cur.fetchone()
        spent, reserved = Decimal(str(spent)), Decimal(str(reserved))
        available = max(sub(sub(cap, spent), reserved), Decimal(0))
        held = Decimal(str(previous)) if previous is not None else Decimal(0)
        if counted or estimate > available:
            # Refused; an earlier reservation of this id stays as it was.
            reason = (
                "this dispatch_id was already counted today"
                if counted
                else f"estimate {estimate} exceeds the remaining {available} (spend {spent}"
                f" + reserved {reserved} of cap {cap}, all instances)"
            )
            admission = Admission(
                dispatch_id=dispatch_id,
                allowed=False,
                remaining=max(sub(available, held), Decimal(0)),
                reason=reason,
            )
        else:
            cur.execute(
                "INSERT INTO budget_reservations AS b (day, dispatch_id, instance, estimate,"
                " expires_at) VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (day, dispatch_id) DO UPDATE SET instance = excluded.instance,"
                " estimate = excluded.estimate, expires_at = excluded.expires_at",
                (day, dispatch_id, self.instance, estimate, ttl_s),
            )
            admission = Admission(
                dispatch_id=dispatch_id, allowed=True, remaining=sub(available, estimate)
            )
        return admission, self._others(cur, day)

    def share_checks(self, day: str, patch: Snapshot | None) -> list[ShareCheck] | None:
        """Every instance's share of ``day`` beside its journal rows, and the
        patch's record of that share beside its journal rows up to that seq;
        None for a schema that no instance of this version has opened yet
        (nothing shared to check)."""
        result: list[ShareCheck] | None = self._run(lambda cur: self._share_checks(cur, day, patch))
        return result

    def _share_checks(self, cur: Any, day: str, patch: Snapshot | None) -> list[ShareCheck] | None:
        if not self._table_exists(cur, "budget_shares"):
            return None
        cur.execute("SELECT instance, spend, dispatches FROM budget_shares WHERE day = %s", (day,))
        shares = {str(r[0]): (Decimal(str(r[1])), int(r[2])) for r in cur.fetchall()}
        cur.execute(
            "SELECT instance, sum(usd), count(*) FROM budget_journal WHERE day = %s"
            " GROUP BY instance",
            (day,),
        )
        journal = {str(r[0]): (Decimal(str(r[1])), int(r[2])) for r in cur.fetchall()}
        in_patch = (patch.shares if patch is not None else None) or {}
        zero = (Decimal(0), 0)
        checks = []
        for name in sorted(shares.keys() | journal.keys() | in_patch.keys()):
            recorded = in_patch.get(name)
            at_patch = zero
            if recorded is not None:
                cur.execute(
                    "SELECT COALESCE(sum(usd), 0), count(*) FROM budget_journal"
                    " WHERE day = %s AND instance = %s AND seq <= %s",
                    (day, name, recorded[2]),
                )
                row = cur.fetchone()
                at_patch = (Decimal(str(row[0])), int(row[1]))
            checks.append(
                ShareCheck(
                    instance=name,
                    share_spend=shares.get(name, zero)[0],
                    share_dispatches=shares.get(name, zero)[1],
                    journal_spend=journal.get(name, zero)[0],
                    journal_dispatches=journal.get(name, zero)[1],
                    patch_spend=None if recorded is None else recorded[0],
                    patch_dispatches=None if recorded is None else recorded[1],
                    at_patch_spend=at_patch[0],
                    at_patch_dispatches=at_patch[1],
                )
            )
        return checks

    def rebuild_patch(self, day: str, daily_cap: Decimal, now: datetime) -> Snapshot:
        """The shares are exact already: rewrite the patch as their sum."""
        body = self.get_patch(PATCH_TYPE, f"budget_{day}")
        cap = Snapshot.from_body(body).daily_cap if body is not None else daily_cap
        seed = Snapshot(
            day=day,
            daily_spend=Decimal(0),
            daily_cap=cap,
            cycle_count=0,
            dispatches=0,
            alerts_sent=(),
            seq=0,
        )
        self.write([], [seed], [], now)
        body = self.get_patch(PATCH_TYPE, f"budget_{day}")
        assert body is not None
        return Snapshot.from_body(body)

    def _time_param(self, moment: datetime) -> Any:
        return moment

    def _read_body(self, value: Any) -> dict[str, Any]:
        body: dict[str, Any] = value
        return body

    def _read_time(self, value: Any) -> datetime:
        moment: datetime = value
        return moment


def _search_path(query: str) -> str:
    # The schema is part of where the costs belong (one service per schema).
    options = parse_qs(query).get("options", [""])[0]
    return options if "search_path" in options else ""


def default_instance_id() -> str:
    """Host name and process id: unique among live processes, and a restarted
    process gets a new id (its predecessor's share stays, counted once)."""
    return f"{socket.gethostname()}-{os.getpid()}"
