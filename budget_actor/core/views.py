"""The figures the service shows: ``spend`` pushes, ``alert`` pushes, health,
admissions and receipts.

These Structs are both the in-process return values and, encoded by msgspec,
the wire messages of the contract: amounts are ``Decimal`` (encoded as JSON
strings), fractions such as utilization and thresholds are floats.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

import msgspec


class Spend(
    msgspec.Struct, frozen=True, kw_only=True, tag="spend", tag_field="type", omit_defaults=True
):
    """The day's spend, as pushed to subscribers.

    When several instances share the budget (PostgreSQL), ``daily_spend`` and
    ``dispatches`` are global (this instance's live figures plus the others'
    as last synced) and ``instance``, ``instance_spend`` and
    ``instance_dispatches`` give this instance's own share; alone (SQLite)
    those three are omitted.
    """

    day: str
    daily_spend: Decimal
    daily_cap: Decimal
    remaining: Decimal
    utilization: float
    dispatches: int
    seq: int
    instance: str | None = None
    instance_spend: Decimal | None = None
    instance_dispatches: int | None = None


class AlertNotice(msgspec.Struct, frozen=True, kw_only=True, tag="alert", tag_field="type"):
    """A threshold crossing, as pushed to subscribers (the nudge to AG Lu)."""

    to: str
    day: str
    threshold: float
    daily_spend: Decimal
    daily_cap: Decimal
    # Only on a forecast alert (--forecast-alert): kind "forecast" and the
    # projected end-of-day spend. Absent on threshold alerts.
    kind: str | None = None
    projected_spend: Decimal | None = None


class Admission(msgspec.Struct, frozen=True, kw_only=True, tag="admission", tag_field="type"):
    """The answer to ``admit``: whether the estimate fits, and what remains.

    ``remaining`` is the cap minus the spend minus every live reservation,
    this one included when it was allowed; ``reason`` says why it was not.
    """

    dispatch_id: str
    allowed: bool
    remaining: Decimal
    reason: str | None = None


class Health(
    msgspec.Struct, frozen=True, kw_only=True, tag="health", tag_field="type", omit_defaults=True
):
    """Every health figure of the contract, plus a few that operators need.

    ``status`` is ``degraded`` while the store is failing or still catching up
    with costs accepted during a failure; ``pending`` counts those costs.
    """

    status: Literal["ok", "degraded"]
    day: str
    daily_spend: Decimal
    daily_cap: Decimal
    remaining: Decimal
    utilization: float
    alert_thresholds: tuple[float, ...]
    alerts_sent: tuple[float, ...]
    cycle_count: int
    cycles_until_persist: int
    last_persist_at: datetime | None
    store: str
    store_ok: bool
    subscribers: int
    uptime_s: float
    dispatches: int
    seq: int
    pending: int
    # USD per hour over the last 5 and 60 minutes (since the start of the day
    # or of this process, if shorter), and the spend at midnight if the day
    # keeps burning at the 60-minute rate.
    burn_rate_5m: Decimal
    burn_rate_60m: Decimal
    projected_spend: Decimal
    # Estimates admitted (``admit``) and not yet settled by their cost or expired.
    reserved: Decimal
    # Since the service started: duplicates acknowledged without counting,
    # and restarts of each supervised task.
    duplicates: int
    restarts: dict[str, int]
    # The last store commit's duration, and how far behind the store is.
    persist_latency_s: float
    store_lag_s: float
    # Lines of the spill file that were not valid costs, set aside in its
    # quarantine file (not counted) for an operator to look at.
    spill_quarantined: int
    # Shared budget only (omitted when alone): this instance's id and share,
    # the number of instances with a share today (this one included), and
    # the age of the last read of the others' totals (the staleness bound of
    # daily_spend is this plus the others' commit latency).
    instance: str | None = None
    instance_spend: Decimal | None = None
    instance_dispatches: int | None = None
    instances: int | None = None
    sync_age_s: float | None = None
    # The last heartbeat cycle counted since this process started (omitted
    # before the first).
    last_cycle_at: datetime | None = None
    # Alert webhook deliveries not yet answered by a 2xx (omitted when no
    # webhook is configured).
    webhooks_pending: int | None = None
    # Echo of the request's ``id``; omitted when the request had none.
    id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Receipt(msgspec.Struct, frozen=True):
    """A durable cost: what :meth:`Budget.record` and the client's ``record``
    return, and one item of an ``acks`` message.

    ``seq`` is the number the cost was given; for a duplicate
    (``duplicate=True``), the original's.
    """

    dispatch_id: str
    seq: int
    duplicate: bool


Update = Spend | AlertNotice
