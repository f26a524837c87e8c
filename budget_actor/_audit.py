"""The audit behind ``budget-actor verify``: recompute a day from its journal
and compare it with the day's budget patch (pure; the command does the I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import msgspec

from ._money import add, sub
from ._records import JournalEntry, Snapshot


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

    @property
    def difference(self) -> Decimal:
        """Patch minus journal at the patch; zero when they agree."""
        return sub(self.patch_spend or Decimal(0), self.at_patch_spend)

    @property
    def agrees(self) -> bool:
        if self.duplicate_ids:
            return False
        if self.patch_spend is None:
            # Nothing to compare yet: the first patch comes after
            # `persist_every` cycles, and the journal alone is consistent.
            return True
        return self.difference == 0 and self.patch_dispatches == self.at_patch_dispatches


def audit(day: str, patch: Snapshot | None, entries: Sequence[JournalEntry]) -> Audit:
    total = at_patch = Decimal(0)
    count = at_count = 0
    seen: set[str] = set()
    duplicates: list[str] = []
    for entry in entries:
        total = add(total, entry.usd)
        count += 1
        if entry.dispatch_id in seen:
            duplicates.append(entry.dispatch_id)
        seen.add(entry.dispatch_id)
        if patch is not None and entry.seq <= patch.seq:
            at_patch = add(at_patch, entry.usd)
            at_count += 1
    if patch is None:
        at_patch, at_count = total, count
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
    )
