"""PostgreSQL: the journal with its dedupe keys, each instance's share of it,
the lock that orders patches, and the guarded nudge.

Every function runs inside the store's transaction, on its cursor.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg

from ...core.dedupe import neighbours
from ...core.money import MONEY_CONTEXT
from ...core.records import NUDGE_TYPE, Alert, JournalEntry, Snapshot
from ..store import Holder, JournalBatch

# Journal rows of one batch, this instance's share of them, and the settling
# of their reservations, in one statement. Only rows actually inserted count
# in the share, so a retried batch (its rows already there) adds nothing, and
# a row whose dispatch_id was counted first (on its day or a day next to it:
# the unique keys of the dedupe window) is left out: the statement returns
# the rows it did not insert. Rows go in dispatch_id order: two instances
# inserting the same ids (on any days) then wait for each other in one
# order, never in a cycle (a deadlock), since rows can only collide on the
# same dispatch_id. COLLATE "C": byte order, which for UTF-8 is the code
# point order Python sorts by (insert_copied), whatever the database's own
# collation.
JOURNAL_INSERT = """
WITH r AS (
    SELECT r.seq, r.day, r.at, c.* FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS r(seq bigint, day text, at timestamptz, cost jsonb),
        jsonb_to_record(r.cost) AS c(dispatch_id text, usd numeric, model text,
            input_tokens bigint, output_tokens bigint, agent text)
), ins AS (
    INSERT INTO budget_journal (instance, seq, day, recorded_at, dispatch_id, usd, model,
        input_tokens, output_tokens, agent)
    SELECT %(instance)s, seq, day, at, dispatch_id, usd, model, input_tokens,
        output_tokens, agent FROM r ORDER BY dispatch_id COLLATE "C", day
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
SELECT r.seq FROM r WHERE (r.day, r.dispatch_id) NOT IN (SELECT day, dispatch_id FROM ins)
"""

# The day number (see budget_actor.core.dedupe.day_number): a text to date
# cast is only "stable" (it reads DateStyle), make_date is immutable.
DAY_NUMBER = (
    "make_date(substr(day, 1, 4)::int, substr(day, 6, 2)::int, substr(day, 9, 2)::int)"
    " - DATE '2000-01-01'"
)


def insert(
    cur: Any, batch: JournalBatch, instance: str | None
) -> tuple[list[JournalEntry], dict[tuple[str, str], list[Holder]]]:
    """Insert the batch's journal rows (see :data:`JOURNAL_INSERT`) in the
    caller's transaction; return the rows refused, with their holders (see
    :func:`holders`)."""
    cur.execute(JOURNAL_INSERT, {"rows": batch.json, "instance": instance})
    missing = {int(r[0]) for r in cur.fetchall()}
    return holders(cur, batch, missing) if missing else ([], {})


def insert_alone(cur: Any, batch: JournalBatch, instance: str | None, begin: str) -> set[int]:
    """The batch's journal rows as a whole transaction of their own, sent in
    one go (libpq's pipeline mode: BEGIN, the insert and COMMIT, then one
    wait for the answers); return the seqs of the rows refused.

    One round trip instead of three: besides the network, every wait lets
    go of the GIL, and getting it back can take a while when the event
    loop is busy. If the insert fails, the server skips the COMMIT and
    psycopg raises when the pipeline ends; the caller rolls back.
    """
    conn = cur.connection
    with conn.cursor() as rows:
        with conn.pipeline():
            cur.execute(begin)
            rows.execute(JOURNAL_INSERT, {"rows": batch.json, "instance": instance})
            cur.execute("COMMIT")
        return {int(r[0]) for r in rows.fetchall()}


# The fast path's statements after the COPY: the batch's share of each day
# (sums made in Python, exact) and the settling of its reservations.
_SETTLE = (
    "DELETE FROM budget_reservations b USING unnest(%s::text[], %s::text[])"
    " AS u(day, dispatch_id) WHERE b.day = u.day AND b.dispatch_id = u.dispatch_id"
)
_COPY = (
    "COPY budget_journal (instance, seq, day, recorded_at, dispatch_id, usd, model,"
    " input_tokens, output_tokens, agent) FROM STDIN"
)


def insert_copied(cur: Any, batch: JournalBatch, instance: str, begin: str) -> bool:
    """The batch's journal rows as a whole transaction of their own, through
    COPY: about twice the rows per second of :data:`JOURNAL_INSERT` on the
    server (plain inserts instead of ``ON CONFLICT`` over three unique keys
    and the statement around them). True if it committed.

    COPY cannot skip a row: if any row's dispatch id is already held in its
    dedupe window (a retried batch, a duplicate that left the ledger's
    cache, another instance's id), the unique keys refuse the whole COPY,
    the transaction is rolled back and this returns False; the caller then
    writes the batch with :func:`insert_alone`, which sorts that out row by
    row. Rows go in dispatch_id order, as there, so instances inserting the
    same ids wait for each other in one order. Other errors propagate (the
    caller rolls back).
    """
    conn = cur.connection
    entries = sorted(batch.entries, key=lambda e: (e.cost.dispatch_id, e.day))
    cur.execute(begin)
    try:
        with cur.copy(_COPY) as copy:
            for e in entries:
                c = e.cost
                copy.write_row(
                    (
                        instance,
                        e.seq,
                        e.day,
                        e.at,
                        c.dispatch_id,
                        c.usd,
                        c.model,
                        c.input_tokens,
                        c.output_tokens,
                        c.agent,
                    )
                )
    except psycopg.errors.UniqueViolation:
        cur.execute("ROLLBACK")
        return False
    with conn.pipeline():
        add_to_share(cur, batch.sums(entries), instance)
        cur.execute(_SETTLE, ([e.day for e in entries], [e.cost.dispatch_id for e in entries]))
        cur.execute("COMMIT")
    return True


def holders(
    cur: Any, batch: JournalBatch, missing: set[int]
) -> tuple[list[JournalEntry], dict[tuple[str, str], list[Holder]]]:
    """The batch's rows whose seqs are ``missing`` (refused by the insert),
    and for each the rows holding its dispatch id in its dedupe window,
    ``(day, dispatch_id) -> [(instance, seq, day)]``."""
    # Not inserted: either this very row is there already (a retried
    # batch) or another row holds its dispatch_id in its window. A new
    # statement sees rows committed while the insert waited on them.
    refused = [entry for entry in batch.entries if entry.seq in missing]
    windows = [(e.cost.dispatch_id, e.day, *neighbours(e.day)) for e in refused]
    cur.execute(
        "SELECT m.day, m.dispatch_id, j.instance, j.seq, j.day FROM budget_journal j"
        " JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[])"
        " AS m(dispatch_id, day, before, after)"
        " ON j.dispatch_id = m.dispatch_id AND j.day IN (m.before, m.day, m.after)",
        tuple(list(column) for column in zip(*windows, strict=True)),
    )
    holders: dict[tuple[str, str], list[Holder]] = {}
    for day, dispatch_id, holder, seq, held_on in cur.fetchall():
        holders.setdefault((day, dispatch_id), []).append((holder, int(seq), held_on))
    return refused, holders


def add_to_share(cur: Any, sums: dict[str, tuple[Decimal, int, int]], instance: str | None) -> None:
    """Add ``sums`` (day -> spend, count, highest seq) to ``instance``'s shares:
    rows that reached the journal without their share."""
    for day, (spend, count, top) in sums.items():
        cur.execute(
            "INSERT INTO budget_shares AS s (day, instance, spend, dispatches, seq)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (day, instance) DO UPDATE SET"
            " spend = s.spend + excluded.spend, dispatches = s.dispatches + excluded.dispatches,"
            " seq = GREATEST(s.seq, excluded.seq), updated_at = now()",
            (day, instance, spend, count, top),
        )


def share_cycles(cur: Any, snap: Snapshot, instance: str | None) -> None:
    """Raise ``instance``'s cycle count of ``snap.day`` to the snapshot's."""
    cur.execute(
        "INSERT INTO budget_shares AS s (day, instance, cycles) VALUES (%s, %s, %s)"
        " ON CONFLICT (day, instance)"
        " DO UPDATE SET cycles = GREATEST(s.cycles, excluded.cycles)",
        (snap.day, instance, snap.cycle_count),
    )


def lock_patch(cur: Any, day: str) -> None:
    """Patches of ``day`` are written in the order they were summed: a
    per-day lock, held to the end of the transaction."""
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext('budget_patch:' || current_schema()), hashtext(%s))",
        (day,),
    )


def insert_nudge(cur: Any, alert: Alert, body: str, stamp: Any) -> str:
    """Insert the nudge row, but a threshold's only if the shared spend in
    the store has reached it: an instance's view can run ahead by a cost
    that turns out to be a duplicate (another instance's, or one counted
    before a restart). Answers as :class:`WriteResult` ``nudges`` does."""
    floor = MONEY_CONTEXT.multiply(alert.threshold, alert.daily_cap)
    cur.execute(
        "INSERT INTO quilt_patches (type, name, body, created_at, updated_at)"
        " SELECT %s, %s, %s::jsonb, %s, %s WHERE %s OR (SELECT COALESCE(sum(spend), 0)"
        " FROM budget_shares WHERE day = %s) >= %s ON CONFLICT (type, name) DO NOTHING",
        (
            NUDGE_TYPE,
            alert.nudge_name,
            body,
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


def max_seq(cur: Any) -> int:
    """The highest seq of any instance."""
    # seq is not a key on PostgreSQL (no index to read the maximum from);
    # every share row holds its instance's highest seq of the day.
    cur.execute("SELECT COALESCE(MAX(seq), 0) FROM budget_shares")
    return int(cur.fetchone()[0])
