"""PostgreSQL: the other instances' totals, read from their share rows."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...core.records import Others

OTHERS = """
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


def others(cur: Any, day: str, instance: str | None) -> Others:
    """What every instance but ``instance`` has made durable for ``day``, and
    every live reservation, in one snapshot."""
    cur.execute(OTHERS, {"day": day, "instance": instance})
    spend, dispatches, cycles, instances, reserved = cur.fetchone()
    return Others(
        day=day,
        spend=Decimal(str(spend)),
        dispatches=int(dispatches),
        cycles=int(cycles),
        instances=int(instances),
        reserved=Decimal(str(reserved)),
    )
