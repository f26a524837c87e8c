"""PostgreSQL: admissions against the global cap of every instance.

The rule is :func:`budget_actor.core.admission.decide`, the ledger's own; only
the figures come from the database here.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ...core.admission import decide
from ...core.dedupe import neighbours
from ...core.views import Admission


def admit(
    cur: Any,
    day: str,
    dispatch_id: str,
    estimate: Decimal,
    cap: Decimal,
    ttl_s: float,
    instance: str | None,
) -> Admission:
    """Reserve ``estimate`` for ``dispatch_id`` if it fits, in the caller's
    transaction.

    The limits of :func:`~budget_actor.core.admission.decide` apply: a
    reservation renewed at most ``MAX_RENEWALS`` times, and at most
    ``MAX_OPEN_RESERVATIONS`` open at once per instance.

    Admissions of one day are serialised by an advisory transaction lock,
    and each reads the spend (sum of shares) and the live reservations in
    one snapshot: a cost's journal row replaces its reservation in one
    transaction, so every admitted estimate is counted exactly once, as
    reserved or as spent.
    """
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext('budget_admit:' || current_schema()), hashtext(%s))",
        (day,),
    )
    cur.execute("DELETE FROM budget_reservations WHERE expires_at <= now()")
    # Counted in the dedupe window: that day, or a day next to it.
    before, after = neighbours(day)
    cur.execute(
        "SELECT (SELECT COALESCE(sum(spend), 0) FROM budget_shares WHERE day = %(day)s),"
        " (SELECT COALESCE(sum(estimate), 0) FROM budget_reservations"
        "   WHERE day = %(day)s AND dispatch_id <> %(id)s),"
        " (SELECT estimate FROM budget_reservations WHERE day = %(day)s"
        "   AND dispatch_id = %(id)s),"
        " (SELECT renewals FROM budget_reservations WHERE day = %(day)s"
        "   AND dispatch_id = %(id)s),"
        " (SELECT count(*) FROM budget_reservations WHERE day = %(day)s"
        "   AND instance = %(instance)s AND dispatch_id <> %(id)s),"
        " (SELECT min(day) FROM budget_journal WHERE dispatch_id = %(id)s"
        "   AND day IN (%(before)s, %(day)s, %(after)s))",
        {
            "day": day,
            "id": dispatch_id,
            "before": before,
            "after": after,
            "instance": instance or "",
        },
    )
    spent, reserved, held, renewals, others_open, counted = cur.fetchone()
    admission = decide(
        dispatch_id,
        estimate,
        cap=cap,
        spent=Decimal(str(spent)),
        reserved=Decimal(str(reserved)),
        held=Decimal(str(held)) if held is not None else Decimal(0),
        counted=counted is not None,
        scope=", all instances",
        counted_on=None if counted in (None, day) else str(counted),
        renewals=renewals if held is not None else None,
        others_open=others_open,
    )
    if admission.allowed:
        cur.execute(
            "INSERT INTO budget_reservations AS b (day, dispatch_id, instance, estimate,"
            " expires_at) VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (day, dispatch_id) DO UPDATE SET instance = excluded.instance,"
            " estimate = excluded.estimate, expires_at = excluded.expires_at,"
            " renewals = b.renewals + 1",
            (day, dispatch_id, instance, estimate, ttl_s),
        )
    return admission
