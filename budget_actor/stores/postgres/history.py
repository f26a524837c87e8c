"""PostgreSQL: what ``GET /history`` reads, summed exactly in the database.

``numeric`` sums are exact, so each day's spend and today's per-minute totals
come back already added up (the journal holds every instance's rows: the
figures are global). Every function runs inside the store's transaction.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...core.history import Curve


def journal_sums(cur: Any, first: str, last: str) -> dict[str, tuple[Decimal, int]]:
    """Spend and count of each day from ``first`` to ``last`` with rows."""
    cur.execute(
        "SELECT day, sum(usd), count(*) FROM budget_journal WHERE day >= %s AND day <= %s"
        " GROUP BY day",
        (first, last),
    )
    return {str(r[0]): (Decimal(str(r[1])), int(r[2])) for r in cur.fetchall()}


def fold_curve(cur: Any, curve: Curve) -> None:
    """Replace ``curve`` with its day's per-minute totals: at most 1,440 rows
    back, however many costs. (seq is per instance here and orders nothing,
    so there is no "rows since last time" to read instead.)"""
    cur.execute(
        "SELECT max(recorded_at), sum(usd) FROM budget_journal WHERE day = %s"
        " GROUP BY date_trunc('minute', recorded_at)",
        (curve.day,),
    )
    curve.replace((row[0], Decimal(str(row[1]))) for row in cur.fetchall())
