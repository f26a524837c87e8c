"""PostgreSQL: what ``budget-actor verify`` checks of a shared budget."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...core.audit import ShareCheck
from ...core.records import Snapshot
from .connection import table_exists


def share_checks(cur: Any, day: str, patch: Snapshot | None) -> list[ShareCheck] | None:
    """Every instance's share of ``day`` beside its journal rows, and the
    patch's record of that share beside its journal rows up to that seq;
    None for a schema that no instance of this version has opened yet
    (nothing shared to check)."""
    if not table_exists(cur, "budget_shares"):
        return None
    cur.execute("SELECT instance, spend, dispatches FROM budget_shares WHERE day = %s", (day,))
    shares = {str(r[0]): (Decimal(str(r[1])), int(r[2])) for r in cur.fetchall()}
    cur.execute(
        "SELECT instance, sum(usd), count(*) FROM budget_journal WHERE day = %s GROUP BY instance",
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
