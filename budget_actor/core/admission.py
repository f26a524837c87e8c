"""The admission rule: does an estimate still fit under the cap?

Written once, here, for both places that decide: the ledger (an instance alone
keeps its reservations in memory) and the PostgreSQL store (instances sharing
a budget decide in the database, where every instance's reservations are).
They differ only in where the figures come from.
"""

from __future__ import annotations

from decimal import Decimal

from .money import sub
from .views import Admission

COUNTED = "this dispatch_id was already counted"
ALREADY_COUNTED = f"{COUNTED} today"


def decide(
    dispatch_id: str,
    estimate: Decimal,
    *,
    cap: Decimal,
    spent: Decimal,
    reserved: Decimal,
    held: Decimal,
    counted: bool,
    scope: str = "",
    counted_on: str | None = None,
) -> Admission:
    """Whether ``estimate`` may be reserved for ``dispatch_id``.

    ``spent`` is the day's spend, ``reserved`` every live reservation but this
    id's, ``held`` this id's own live reservation (0 if none), which a granted
    admission replaces and a refused one leaves as it was. ``counted``: the
    id's cost is in the dedupe window already (today, or ``counted_on``, a
    day next to it), so it is refused. ``scope`` ends the
    refusal's reason (e.g. ", all instances"). Pure; never raises.
    """
    available = max(sub(sub(cap, spent), reserved), Decimal(0))
    if counted or estimate > available:
        reason = (
            (ALREADY_COUNTED if counted_on is None else f"{COUNTED} on {counted_on}")
            if counted
            else f"estimate {estimate} exceeds the remaining {available} (spend {spent}"
            f" + reserved {reserved} of cap {cap}{scope})"
        )
        # The earlier reservation stays, and takes its part of what remains.
        remaining = max(sub(available, held), Decimal(0))
        return Admission(dispatch_id=dispatch_id, allowed=False, remaining=remaining, reason=reason)
    return Admission(dispatch_id=dispatch_id, allowed=True, remaining=sub(available, estimate))
