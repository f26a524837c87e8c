"""The audit behind ``budget-actor verify``: recompute a day from its journal
and compare it with the day's budget patch (pure; the command does the I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import msgspec

from .money import add, sub
from .records import JournalEntry, Snapshot


class ShareCheck(msgspec.Struct, frozen=True, kw_only=True):
    """One instance's share of a day, checked two ways (shared PostgreSQL).

    Its share row against all its journal rows: written in one transaction,
    they must always agree. And the patch's record of the share against its
    journal rows up to the seq that record names.
    """

    instance: str
    share_spend: Decimal
    share_dispatches: int
    journal_spend: Decimal
    journal_dispatches: int
    # None when the patch does not name this instance (it started after).
    patch_spend: Decimal | None = None
    patch_dispatches: int | None = None
    at_patch_spend: Decimal = Decimal(0)
    at_patch_dispatches: int = 0

    @property
    def agrees(self) -> bool:
        row = (self.share_spend, self.share_dispatches) == (
            self.journal_spend,
            self.journal_dispatches,
        )
        patched = self.patch_spend is None or (self.patch_spend, self.patch_dispatches) == (
            self.at_patch_spend,
            self.at_patch_dispatches,
        )
        return row and patched


class Audit(msgspec.Struct, frozen=True, kw_only=True):
    day: str
    journal_spend: Decimal
    journal_dispatches: int
    # None when the day has no budget patch.
    patch_spend: Decimal | None
    patch_dispatches: int | None
    patch_seq: int | None
    # The journal up to the patch's seq: what the patch must equal.
    at_patch_spend: Decimal
    at_patch_dispatches: int
    # Costs journaled after the patch (normal: the next patch will hold them).
    after_patch_spend: Decimal
    after_patch_dispatches: int
    duplicate_ids: tuple[str, ...]
    # Shared budget (PostgreSQL): each instance's share against its journal.
    # A patch that names its shares is checked share by share; one written
    # before instances shared a budget (no shares named), by its seq.
    shares: tuple[ShareCheck, ...] | None = None

    @property
    def difference(self) -> Decimal:
        """Patch minus journal at the patch; zero when they agree."""
        return sub(self.patch_spend or Decimal(0), self.at_patch_spend)

    @property
    def agrees(self) -> bool:
        if self.duplicate_ids:
            return False
        if self.shares is not None:
            totals = self.patch_spend is None or (
                self.difference == 0 and self.patch_dispatches == self.at_patch_dispatches
            )
            return totals and all(share.agrees for share in self.shares)
        if self.patch_spend is None:
            # Nothing to compare yet: the first patch comes after
            # `persist_every` cycles, and the journal alone is consistent.
            return True
        return self.difference == 0 and self.patch_dispatches == self.at_patch_dispatches


def audit(
    day: str,
    patch: Snapshot | None,
    entries: Sequence[JournalEntry],
    shares: Sequence[ShareCheck] | None = None,
) -> Audit:
    """Recompute ``day`` from ``entries``; ``shares`` only for a shared store."""
    total = at_patch = Decimal(0)
    count = at_count = 0
    seen: set[str] = set()
    duplicates: list[str] = []
    for entry in entries:
        cost = entry.cost
        total = add(total, cost.usd)
        count += 1
        if cost.dispatch_id in seen:
            duplicates.append(cost.dispatch_id)
        seen.add(cost.dispatch_id)
        if patch is not None and entry.seq <= patch.seq:
            at_patch = add(at_patch, cost.usd)
            at_count += 1
    if patch is None:
        at_patch, at_count = total, count
    elif shares is not None and patch.shares is not None:
        # Seqs are per instance: the journal "at the patch" is the sum, over
        # the instances the patch names, of each one's rows up to its seq.
        at_patch, at_count = Decimal(0), 0
        for share in shares:
            if share.patch_spend is not None:
                at_patch = add(at_patch, share.at_patch_spend)
                at_count += share.at_patch_dispatches
    return Audit(
        day=day,
        journal_spend=total,
        journal_dispatches=count,
        patch_spend=None if patch is None else patch.daily_spend,
        patch_dispatches=None if patch is None else patch.dispatches,
        patch_seq=None if patch is None else patch.seq,
        at_patch_spend=at_patch,
        at_patch_dispatches=at_count,
        after_patch_spend=sub(total, at_patch),
        after_patch_dispatches=count - at_count,
        duplicate_ids=tuple(duplicates),
        shares=None if shares is None else tuple(shares),
    )
