"""Burn rate, end-of-day projection and the forecast alert (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budget_actor.core.burn import BurnRate, project
from budget_actor.core.config import make_config
from budget_actor.core.cost import Cost
from budget_actor.core.ledger import AlertDue, Ledger, day_bounds

MIDNIGHT = datetime(2026, 12, 1, tzinfo=UTC)


def test_rates_over_5_and_60_minutes() -> None:
    burn = BurnRate(MIDNIGHT, Decimal(0))
    spend = Decimal(0)
    now = MIDNIGHT
    for minute in range(1, 121):  # $1 a minute for an hour, then $3 a minute
        now = MIDNIGHT + timedelta(minutes=minute)
        spend += 1 if minute <= 60 else 3
        burn.observe(now, spend)
    # Within one 10-second bucket at the window's edge: here, one $3 cost.
    assert Decimal(180) <= burn.rate(now, 300) <= Decimal(216)
    assert Decimal(180) <= burn.rate(now, 3600) <= Decimal(183)
    quiet = now + timedelta(minutes=30)  # nothing spent for half an hour
    assert burn.rate(quiet, 300) == 0
    # The last 60 minutes hold the last 30 minutes of $3 costs: about $90.
    assert Decimal(90) <= burn.rate(quiet, 3600) <= Decimal(93)


def test_history_is_bounded_whatever_the_traffic() -> None:
    burn = BurnRate(MIDNIGHT, Decimal(0))
    for second in range(0, 4 * 3600, 2):
        burn.observe(MIDNIGHT + timedelta(seconds=second), Decimal(second))
    assert len(burn._samples) <= 3610 / 10 + 3
    # $1 per second, whichever window.
    end = MIDNIGHT + timedelta(seconds=4 * 3600 - 2)
    assert burn.rate(end, 3600) == pytest.approx(Decimal(3600), rel=Decimal("0.01"))


def test_a_young_day_is_not_an_infinite_rate() -> None:
    burn = BurnRate(MIDNIGHT, Decimal(0))
    burn.observe(MIDNIGHT + timedelta(seconds=1), Decimal(1))
    # One dollar in the first second reads as $1 per minute at most.
    assert burn.rate(MIDNIGHT + timedelta(seconds=1), 3600) == Decimal(60)


def test_projection_to_midnight() -> None:
    noon = MIDNIGHT + timedelta(hours=12)
    assert project(Decimal(6), Decimal(1), noon, MIDNIGHT + timedelta(days=1)) == Decimal(18)
    late = MIDNIGHT + timedelta(days=1, hours=1)
    assert project(Decimal(6), Decimal(1), late, MIDNIGHT + timedelta(days=1)) == Decimal(6)


def test_health_reports_burn_and_projection() -> None:
    ledger = Ledger(make_config(daily_cap="100"), MIDNIGHT + timedelta(hours=11))
    for minute in range(60):
        at = MIDNIGHT + timedelta(hours=11, minutes=minute)
        ledger.record(at, Cost(f"d{minute}", Decimal("0.05")))
    noon = MIDNIGHT + timedelta(hours=12)
    health = ledger.health(noon, store="sqlite", subscribers=0, uptime_s=0)
    assert health.burn_rate_60m == Decimal("3")
    assert health.projected_spend == Decimal("3") + Decimal("3") * 12


def test_forecast_alert_fires_once_and_not_after_the_cap() -> None:
    config = make_config(daily_cap="10", forecast_alert=True)
    start = MIDNIGHT + timedelta(hours=20)
    ledger = Ledger(config, start)
    assert ledger.tick(start + timedelta(minutes=1)).effects == ()  # nothing spent: no projection
    # $3 in the last hour of a fresh day: $3/h, so 3 + 3 * 3.95 h > 10 at 20:03.
    ledger.record(start + timedelta(minutes=2), Cost("a", Decimal("3")))
    effects = ledger.tick(start + timedelta(minutes=3)).effects
    assert len(effects) == 1 and isinstance(effects[0], AlertDue)
    alert = effects[0].alert
    assert alert.kind == "forecast" and alert.nudge_name == "budget_forecast_2026-12-01"
    assert alert.projected_spend is not None and alert.projected_spend > 10
    assert ledger.tick(start + timedelta(minutes=4)).effects == ()
    off = Ledger(make_config(daily_cap="10"), start)
    off.record(start + timedelta(minutes=2), Cost("a", Decimal("3")))
    assert off.tick(start + timedelta(minutes=3)).effects == ()
    over = Ledger(config, start)
    over.record(start, Cost("a", Decimal("11")))
    assert [
        e for e in over.tick(start + timedelta(minutes=3)).effects if e.alert.kind == "forecast"
    ] == []  # type: ignore[union-attr]


def test_day_bounds_follow_dst() -> None:
    paris = make_config(timezone="Europe/Paris")
    day, start, end = day_bounds(datetime(2026, 3, 29, 12, tzinfo=UTC), paris)
    assert day == "2026-03-29"
    assert (start, end - start) == (datetime(2026, 3, 28, 23, tzinfo=UTC), timedelta(hours=23))
