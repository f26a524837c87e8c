"""``budget-actor report``: spend per day against the cap, from the store.

The aggregation and the three output formats are pure functions of journal
entries and patch bodies (tested directly); :func:`read_days` is the only I/O.
Amounts are summed exactly (``Decimal`` under the money context) and are
strings in JSON and CSV, as everywhere else.

A day's spend and dispatches come from the cost journal, which holds every
acknowledged cost. The day's cap is the ``daily_cap`` of its budget patch
(what the service ran with that day); a day without a patch shows the cap
given on the command line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Literal

import msgspec

from ..core.money import RATIO_CONTEXT, add, to_wire
from ..core.records import PATCH_TYPE, JournalEntry, Snapshot
from ..stores.store import Store

By = Literal["model", "agent"]
MAX_DAYS = 366


class Group(msgspec.Struct, frozen=True, kw_only=True):
    """The costs of one model (or agent): ``key`` is None for costs without one."""

    key: str | None
    spend: Decimal
    dispatches: int
    input_tokens: int
    output_tokens: int


class Day(msgspec.Struct, frozen=True, kw_only=True):
    day: str
    spend: Decimal
    cap: Decimal
    # "patch": the cap of the day's budget patch; "default": --daily-cap.
    cap_from: Literal["patch", "default"]
    dispatches: int
    # The breakdown by model or agent (empty without --by), biggest first.
    groups: tuple[Group, ...] = ()

    @property
    def utilization(self) -> float:
        return float(RATIO_CONTEXT.divide(self.spend, self.cap)) if self.cap else 0.0


class Report(msgspec.Struct, frozen=True, kw_only=True):
    days: tuple[Day, ...]
    by: By | None
    spend: Decimal
    dispatches: int
    # The breakdown over the whole period (empty without --by), biggest first.
    groups: tuple[Group, ...]


def last_days(today: date, count: int) -> list[str]:
    """The ``count`` days ending with ``today``, oldest first, as ``YYYY-MM-DD``."""
    return [(today - timedelta(days=back)).isoformat() for back in range(count - 1, -1, -1)]


def breakdown(entries: Iterable[JournalEntry], by: By) -> tuple[Group, ...]:
    """Spend, dispatches and tokens per model (or agent), biggest spend first
    (ties by name; costs without a name last among equals)."""
    sums: dict[str | None, list[Any]] = {}
    for entry in entries:
        cost = entry.cost
        key = cost.model if by == "model" else cost.agent
        row = sums.setdefault(key, [Decimal(0), 0, 0, 0])
        row[0] = add(row[0], cost.usd)
        row[1] += 1
        row[2] += cost.input_tokens or 0
        row[3] += cost.output_tokens or 0
    groups = [
        Group(key=key, spend=s, dispatches=n, input_tokens=i, output_tokens=o)
        for key, (s, n, i, o) in sums.items()
    ]
    return _ordered(groups)


def merge(groups: Iterable[Group]) -> tuple[Group, ...]:
    """Groups with the same key (from several days) summed into one."""
    merged: dict[str | None, Group] = {}
    for group in groups:
        seen = merged.get(group.key)
        if seen is not None:
            group = Group(
                key=group.key,
                spend=add(seen.spend, group.spend),
                dispatches=seen.dispatches + group.dispatches,
                input_tokens=seen.input_tokens + group.input_tokens,
                output_tokens=seen.output_tokens + group.output_tokens,
            )
        merged[group.key] = group
    return _ordered(merged.values())


def _ordered(groups: Iterable[Group]) -> tuple[Group, ...]:
    return tuple(sorted(groups, key=lambda g: (-g.spend, g.key is None, g.key or "")))


def summarize_day(
    day: str,
    entries: Sequence[JournalEntry],
    patch: dict[str, Any] | None,
    default_cap: Decimal,
    by: By | None = None,
) -> Day:
    """One day's row from its journal entries and its budget patch body (or None)."""
    spend = Decimal(0)
    for entry in entries:
        spend = add(spend, entry.cost.usd)
    dispatches = len(entries)
    snapshot = Snapshot.from_body(patch) if patch is not None else None
    if snapshot is not None and not entries:
        # A patch but no journal rows (written by an older version, or the
        # journal was pruned): the patch is all there is.
        spend, dispatches = snapshot.daily_spend, snapshot.dispatches
    return Day(
        day=day,
        spend=spend,
        cap=snapshot.daily_cap if snapshot is not None else default_cap,
        cap_from="patch" if snapshot is not None else "default",
        dispatches=dispatches,
        groups=breakdown(entries, by) if by is not None else (),
    )


def build(days: Sequence[Day], by: By | None = None) -> Report:
    spend = Decimal(0)
    for day in days:
        spend = add(spend, day.spend)
    return Report(
        days=tuple(days),
        by=by,
        spend=spend,
        dispatches=sum(day.dispatches for day in days),
        groups=merge(g for day in days for g in day.groups) if by is not None else (),
    )


def read_days(store: Store, days: Sequence[str], default_cap: Decimal, by: By | None) -> Report:
    """Read ``days`` from an opened store (blocking). Raises StoreError."""
    rows = []
    for day in days:
        patch = store.get_patch(PATCH_TYPE, f"budget_{day}")
        rows.append(summarize_day(day, store.journal(day), patch, default_cap, by))
    return build(rows, by)


# -- output ------------------------------------------------------------------


def _percent(fraction: float) -> str:
    return f"{fraction:.1%}"


def _group_json(group: Group, by: By) -> dict[str, Any]:
    return {
        by: group.key,
        "spend": to_wire(group.spend),
        "dispatches": group.dispatches,
        "input_tokens": group.input_tokens,
        "output_tokens": group.output_tokens,
    }


def to_json(report: Report) -> str:
    days = []
    for day in report.days:
        row: dict[str, Any] = {
            "day": day.day,
            "daily_spend": to_wire(day.spend),
            "daily_cap": to_wire(day.cap),
            "cap_from": day.cap_from,
            "utilization": day.utilization,
            "dispatches": day.dispatches,
        }
        if report.by is not None:
            row[f"by_{report.by}"] = [_group_json(g, report.by) for g in day.groups]
        days.append(row)
    body: dict[str, Any] = {
        "days": days,
        "total": {"spend": to_wire(report.spend), "dispatches": report.dispatches},
    }
    if report.by is not None:
        body["by"] = report.by
        body["breakdown"] = [_group_json(g, report.by) for g in report.groups]
    return json.dumps(body, indent=2)


# A spreadsheet takes a cell that starts with one of these as a formula
# (CSV injection): `=HYPERLINK(...)` in a model name would run when the report
# is opened. Such a cell gets a leading apostrophe, which spreadsheets show
# as text and do not evaluate (OWASP's advice).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class _SafeWriter:
    """A csv writer whose text cells cannot start a formula, and whose rows
    end in ``\n`` while a cell holding a bare ``\r`` is still quoted (the
    csv module quotes only the characters of its own line terminator)."""

    def __init__(self, out: io.StringIO) -> None:
        self._out = out
        self._row = io.StringIO()
        self._writer = csv.writer(self._row, lineterminator="\r\n")

    def writerow(self, row: Sequence[object]) -> None:
        self._row.seek(0)
        self._row.truncate()
        self._writer.writerow([_cell(value) for value in row])
        self._out.write(self._row.getvalue().removesuffix("\r\n") + "\n")


def to_csv(report: Report) -> str:
    """Without ``by``: one row per day. With it: one row per day and model (or
    agent), so that summing a column gives the totals. A text cell that a
    spreadsheet would take for a formula is prefixed with ``'``."""
    out = io.StringIO()
    writer = _SafeWriter(out)
    if report.by is None:
        writer.writerow(
            ["day", "daily_spend", "daily_cap", "cap_from", "utilization", "dispatches"]
        )
        for day in report.days:
            writer.writerow(
                [
                    day.day,
                    to_wire(day.spend),
                    to_wire(day.cap),
                    day.cap_from,
                    repr(day.utilization),
                    day.dispatches,
                ]
            )
    else:
        writer.writerow(["day", report.by, "spend", "dispatches", "input_tokens", "output_tokens"])
        for day in report.days:
            for g in day.groups:
                writer.writerow(
                    [
                        day.day,
                        g.key or "",
                        to_wire(g.spend),
                        g.dispatches,
                        g.input_tokens,
                        g.output_tokens,
                    ]
                )
    return out.getvalue()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def to_table(report: Report) -> str:
    rows = []
    for day in report.days:
        cap = to_wire(day.cap) + ("" if day.cap_from == "patch" else "*")
        rows.append(
            [day.day, to_wire(day.spend), cap, _percent(day.utilization), str(day.dispatches)]
        )
    rows.append(["total", to_wire(report.spend), "", "", str(report.dispatches)])
    lines = _table(["day", "spend", "cap", "used", "dispatches"], rows, {1, 2, 3, 4})
    if any(day.cap_from == "default" for day in report.days):
        lines.append("* no budget patch that day: the cap is --daily-cap")
    if report.by is not None and report.days:
        first, last = report.days[0].day, report.days[-1].day
        lines += ["", f"by {report.by}, {first} to {last}"]
        group_rows = [
            [
                g.key if g.key is not None else "(none)",
                to_wire(g.spend),
                _percent(float(RATIO_CONTEXT.divide(g.spend, report.spend)))
                if report.spend
                else "-",
                str(g.dispatches),
                str(g.input_tokens),
                str(g.output_tokens),
            ]
            for g in report.groups
        ]
        if group_rows:
            header = [report.by, "spend", "share", "dispatches", "input tokens", "output tokens"]
            lines += _table(header, group_rows, {1, 2, 3, 4, 5})
        else:
            lines.append("(no costs)")
    return "\n".join(lines) + "\n"


def render(report: Report, fmt: Literal["table", "json", "csv"]) -> str:
    if fmt == "json":
        return to_json(report) + "\n"
    if fmt == "csv":
        return to_csv(report)
    return to_table(report)
