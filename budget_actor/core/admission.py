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
# Reservations open at once per decider (an instance's ledger, or one
# instance's rows in the shared store): as many dispatches as can be in
# flight together, many times over (the connection's ack window is 1,024),
# yet a bound on the memory and rows that a client admitting in a loop can
# make. The service cannot tell dispatchers apart (one token), so this is
# the finest identity it has.
MAX_OPEN_RESERVATIONS = 1000
# Times one reservation may be renewed (admitted again with the same id while
# it holds), each renewal giving it a fresh reservation-ttl: a long dispatch
# may re-estimate a few times, but a reservation renewed more is being held,
# not used, and would keep its part of the cap from everyone else. Renewed
# three times, it holds for at most four TTLs (40 minutes by default).
MAX_RENEWALS = 3


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
    renewals: int | None = None,
    others_open: int = 0,
) -> Admission:
    """Whether ``estimate`` may be reserved for ``dispatch_id``.

    ``spent`` is the day's spend, ``reserved`` every live reservation but this
    id's, ``held`` this id's own live reservation (0 if none), which a granted
    admission replaces and a refused one leaves as it was. ``counted``: the
    id's cost is in the dedupe window already (today, or ``counted_on``, a
    day next to it), so it is refused. ``renewals``: how often this id's live
    reservation was renewed already (None: it has none), at most
    :data:`MAX_RENEWALS`; ``others_open``: the decider's other live
    reservations, at most :data:`MAX_OPEN_RESERVATIONS` with a new one.
    ``scope`` ends the refusal's reason (e.g. ", all instances"). Pure;
    never raises.
    """
    available = max(sub(sub(cap, spent), reserved), Decimal(0))
    reason = None
    if counted:
        reason = ALREADY_COUNTED if counted_on is None else f"{COUNTED} on {counted_on}"
    elif renewals is not None and renewals >= MAX_RENEWALS:
        reason = (
            f"this reservation was renewed {renewals} times, the most allowed; send its"
            " cost, or let it expire"
        )
    elif renewals is None and others_open >= MAX_OPEN_RESERVATIONS:
        reason = (
            f"{others_open} reservations are open, the most allowed; send their costs,"
            " or let them expire"
        )
    elif estimate > available:
        reason = (
            f"estimate {estimate} exceeds the remaining {available} (spend {spent}"
            f" + reserved {reserved} of cap {cap}{scope})"
        )
    if reason is not None:
        # The earlier reservation stays, and takes its part of what remains.
        remaining = max(sub(available, held), Decimal(0))
        return Admission(dispatch_id=dispatch_id, allowed=False, remaining=remaining, reason=reason)
    return Admission(dispatch_id=dispatch_id, allowed=True, remaining=sub(available, estimate))
