"""The values that cross from the accounting to the store and the wire.

These are plain, immutable msgspec Structs: a budget patch snapshot, a journal
entry for one accepted cost (holding its :class:`~.cost.Cost`), an alert
(sibling nudge), and what a store hands back on restore. They know how to
render the database rows that the contract fixes (``quilt_patches``) so that
both stores write byte-identical bodies.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec

from .cost import Cost
from .money import to_wire

PATCH_TYPE = "budget"
NUDGE_TYPE = "sibling_nudge"
NUDGE_FROM = "budget_actor"


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One day's totals: the body of the ``budget_{day}`` patch."""

    day: str
    daily_spend: Decimal
    daily_cap: Decimal
    cycle_count: int
    dispatches: int
    alerts_sent: tuple[Decimal, ...]
    # Highest journal sequence number included in these totals; restore
    # replays only journal entries after it.
    seq: int
    # Shared budget (PostgreSQL): the totals per instance that this patch
    # sums, instance -> (spend, dispatches, highest seq of that instance),
    # so that `verify` can check each against that instance's journal.
    shares: dict[str, tuple[Decimal, int, int]] | None = None

    @property
    def patch_name(self) -> str:
        return f"budget_{self.day}"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "date": self.day,
            "daily_spend": to_wire(self.daily_spend),
            "daily_cap": to_wire(self.daily_cap),
            "cycle_count": self.cycle_count,
            "dispatches": self.dispatches,
            "alerts_sent": [float(t) for t in self.alerts_sent],
            "seq": self.seq,
        }
        if self.shares is not None:
            body["shares"] = {
                name: {"daily_spend": to_wire(spend), "dispatches": count, "seq": seq}
                for name, (spend, count, seq) in sorted(self.shares.items())
            }
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Snapshot:
        return cls(
            day=str(body["date"]),
            daily_spend=Decimal(str(body["daily_spend"])),
            daily_cap=Decimal(str(body["daily_cap"])),
            cycle_count=int(body.get("cycle_count", 0)),
            dispatches=int(body.get("dispatches", 0)),
            alerts_sent=tuple(Decimal(str(t)) for t in body.get("alerts_sent", ())),
            seq=int(body.get("seq", 0)),
            shares=None
            if "shares" not in body
            else {
                str(name): (Decimal(str(v["daily_spend"])), int(v["dispatches"]), int(v["seq"]))
                for name, v in body["shares"].items()
            },
        )


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted cost, as the journal keeps it: the :class:`Cost` as it was
    decoded or built, with what counting it added (its number, day and time)."""

    seq: int
    day: str
    at: datetime
    cost: Cost


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """A threshold crossing: the sibling nudge to ``to``."""

    to: str
    day: str
    threshold: Decimal
    daily_spend: Decimal
    daily_cap: Decimal
    created_at: datetime
    # "forecast": the projected end-of-day spend crossed the cap (see
    # --forecast-alert); threshold is then 1.
    kind: Literal["threshold", "forecast"] = "threshold"
    projected_spend: Decimal | None = None

    @property
    def percent(self) -> str:
        return format((self.threshold * 100).normalize(), "f")

    @property
    def nudge_name(self) -> str:
        if self.kind == "forecast":
            return f"budget_forecast_{self.day}"
        return f"budget_alert_{self.day}_{self.percent}"

    def body(self) -> dict[str, Any]:
        body = {
            "to": self.to,
            "from": NUDGE_FROM,
            "day": self.day,
            "threshold": float(self.threshold),
            "daily_spend": to_wire(self.daily_spend),
            "daily_cap": to_wire(self.daily_cap),
            "created_at": iso_utc(self.created_at),
        }
        if self.projected_spend is not None:
            body["kind"] = self.kind
            body["projected_spend"] = to_wire(self.projected_spend)
        return body


class Others(msgspec.Struct, frozen=True, kw_only=True):
    """What the other instances sharing the budget have made durable for ``day``
    (PostgreSQL only), as read in one snapshot of the store."""

    day: str
    spend: Decimal = Decimal(0)
    dispatches: int = 0
    cycles: int = 0
    # Instances with a share of ``day``, this one excluded.
    instances: int = 0
    # Live admitted estimates of every instance (this one included): the
    # reservations are global.
    reserved: Decimal = Decimal(0)


class WriteResult(msgspec.Struct, kw_only=True):
    """What one :meth:`Store.write` did beyond "all of it".

    ``nudges`` maps each nudge row name in the write to ``"inserted"`` (this
    write created it), ``"exists"`` (someone had, earlier) or ``"premature"``
    (the shared spend in the store has not reached the threshold: not written;
    only when instances share a budget, see :mod:`budget_actor.runtime.coordinator`).
    ``duplicates`` maps the seq of each journal entry that the store refused
    because its ``dispatch_id`` was counted already, on its day or a day next
    to it (by another instance, before a restart, or by this ledger long
    enough ago to have left its cache), to that original's (seq, day).
    """

    nudges: dict[str, str] = msgspec.field(default_factory=dict)
    duplicates: dict[int, tuple[int, str]] = msgspec.field(default_factory=dict)

    @property
    def inserted(self) -> set[str]:
        return {name for name, what in self.nudges.items() if what == "inserted"}


class Restored(msgspec.Struct, frozen=True, kw_only=True):
    """What a store knows about ``day`` at startup: a few rows whatever the
    day's volume (no dispatch ids: the store's unique keys dedupe)."""

    day: str
    # This service's totals of ``day`` as the store keeps them exactly (its
    # share row, written in the same transaction as its journal rows), if any.
    patch: Snapshot | None
    # Journal entries of ``day`` with a seq above the patch's, in seq order
    # (the tail: empty unless rows were written without their share).
    entries: tuple[JournalEntry, ...]
    # Thresholds whose nudge row for ``day`` exists.
    alerts_sent: frozenset[Decimal]
    # Whether the forecast nudge of ``day`` was sent.
    forecast_sent: bool = False
    # Highest seq ever journaled or patched, so seq keeps growing.
    max_seq: int
    # Shared budget (PostgreSQL): this instance's id and the others' totals.
    instance: str | None = None
    others: Others | None = None


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC, the timestamp format of the SQLite store and bodies."""
    return moment.astimezone(UTC).isoformat()
