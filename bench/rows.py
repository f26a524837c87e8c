"""A benchmark figure, its target, and the helpers scenarios share."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Row:
    """One measured figure of one scenario.

    ``at_least`` / ``at_most`` give the target; a row with neither is
    informational (no pass/fail). ``samples`` are the per-round values that
    ``value`` summarises (the median, unless ``note`` says otherwise).
    """

    scenario: str
    figure: str
    value: float
    unit: str
    at_least: float | None = None
    at_most: float | None = None
    samples: tuple[float, ...] = ()
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """True/False against the target; None when the row has no target."""
        if self.at_least is None and self.at_most is None:
            return None
        if self.at_least is not None and self.value < self.at_least:
            return False
        return not (self.at_most is not None and self.value > self.at_most)

    @property
    def target(self) -> str:
        parts = []
        if self.at_least is not None:
            parts.append(f"≥ {format_number(self.at_least)}")
        if self.at_most is not None:
            parts.append(f"≤ {format_number(self.at_most)}")
        return " and ".join(parts) or "-"

    @property
    def verdict(self) -> str:
        passed = self.passed
        return "-" if passed is None else ("pass" if passed else "FAIL")

    def shown(self) -> str:
        """The figure column: what was measured and its value."""
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.figure}: {format_number(self.value)}{unit}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        data["target"] = self.target
        data["passed"] = self.passed
        return data


def format_number(value: float) -> str:
    """Large figures with thousands separators, small ones with two decimals."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) of already sorted values, interpolated
    linearly between the two nearest ranks (numpy's default method)."""
    if not ordered:
        raise ValueError("quantile of no values")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
