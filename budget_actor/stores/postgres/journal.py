"""PostgreSQL: the journal, each instance's share of it, the patch as the sum
of the shares, and the guarded nudge.

Every function runs inside the store's transaction, on its cursor.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...core.money import MONEY_CONTEXT, add
from ...core.records import NUDGE_TYPE, Alert, Snapshot, WriteResult

# Journal rows of one batch, this instance's share of them, and the settling
# of their reservations, in one statement. Only rows actually inserted count
# in the share, so a retried batch (its rows already there) adds nothing, and
# a row that another instance counted first (same day and dispatch_id) is
# left out: the statement returns the rows it did not insert. Rows go in
# (day, dispatch_id) order: two instances inserting the same ids then wait
# for each other in one order, never in a cycle (a deadlock).
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


def insert(cur: Any, rows: str, instance: str | None, result: WriteResult) -> None:
    """Insert the journal rows of one JSON array (see :data:`JOURNAL_INSERT`),
    and note in ``result`` each row that another instance counted first."""
    cur.execute(JOURNAL_INSERT, {"rows": rows, "instance": instance})
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
        if holder is not None and holder != (instance, int(seq)):
            result.duplicates[int(seq)] = holder[1]


def summed_patch(cur: Any, snap: Snapshot, instance: str | None, sent: set[Decimal]) -> Snapshot:
    """The patch of ``snap.day`` as the sum of every instance's share.

    ``snap`` contributes this instance's cycle count (to its share) and
    the cap; spend and dispatches come from the shares, exact, under a
    per-day lock (held to the end of the transaction) so that patches are
    written in the order they were summed. ``sent``: the thresholds whose
    nudge rows exist.
    """
    cur.execute(
        "INSERT INTO budget_shares AS s (day, instance, cycles) VALUES (%s, %s, %s)"
        " ON CONFLICT (day, instance)"
        " DO UPDATE SET cycles = GREATEST(s.cycles, excluded.cycles)",
        (snap.day, instance, snap.cycle_count),
    )
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext('budget_patch:' || current_schema()), hashtext(%s))",
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
    return Snapshot(
        day=snap.day,
        daily_spend=spend,
        daily_cap=snap.daily_cap,
        cycle_count=cycles,
        dispatches=dispatches,
        alerts_sent=tuple(sorted(set(snap.alerts_sent) | sent)),
        seq=max((seq for _, _, seq in shares.values()), default=0),
        shares=shares,
    )


def insert_nudge(cur: Any, alert: Alert, body: str, stamp: Any) -> str:
    """Insert the nudge row, but a threshold's only if the shared spend in
    the store has reached it: an instance's view can run ahead by a cost
    that turns out to be another instance's duplicate. Answers as
    :class:`WriteResult` ``nudges`` does."""
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


def own_share(cur: Any, day: str, instance: str | None) -> Snapshot | None:
    """``instance``'s share row of ``day`` as a snapshot (restore starts from
    it, as SQLite's starts from the patch), or None."""
    cur.execute(
        "SELECT spend, dispatches, cycles, seq FROM budget_shares WHERE day = %s AND instance = %s",
        (day, instance),
    )
    row = cur.fetchone()
    if row is None:
        return None
    return Snapshot(
        day=day,
        daily_spend=Decimal(str(row[0])),
        daily_cap=Decimal(0),  # not used: the cap comes from the configuration
        cycle_count=int(row[2]),
        dispatches=int(row[1]),
        alerts_sent=(),
        seq=int(row[3]),
    )


def max_seq(cur: Any) -> int:
    """The highest seq of any instance."""
    # seq is not a key on PostgreSQL (no index to read the maximum from);
    # every share row holds its instance's highest seq of the day.
    cur.execute("SELECT COALESCE(MAX(seq), 0) FROM budget_shares")
    return int(cur.fetchone()[0])
