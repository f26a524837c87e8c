"""``GET /metrics``: the health figures through ``prometheus_client``.

A custom collector (:class:`BudgetCollector`) turns one health snapshot, the
service's histograms (:class:`~budget_actor.runtime.stats.ServiceStats`) and
the server's error counts into metric families; ``prometheus_client`` writes
them in the Prometheus text format (0.0.4) or, when the scraper's ``Accept``
header asks for it, in OpenMetrics. Nothing is registered globally: each
scrape builds its own collector from figures read a moment before, so a
scrape never touches the budget actor's state directly.

Prometheus values are float64: amounts are exact in ``/health``, and here as
close as a float gets (``0.1`` stays ``0.1``; more than about 15 significant
digits do not survive).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Decimal

from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..core.histogram import Histogram
from ..core.views import Health
from ..runtime.stats import ServiceStats

_PREFIX = "budget_"


class BudgetCollector:
    """One scrape's worth of figures, as a ``prometheus_client`` collector."""

    def __init__(
        self,
        health: Health,
        stats: ServiceStats | None = None,
        errors: Mapping[str, int] | None = None,
    ) -> None:
        self.health = health
        self.stats = stats
        self.errors = errors or {}

    def collect(self) -> Iterator[Metric]:
        yield from self._spend()
        yield from self._progress()
        yield from self._store()
        yield from self._counters()
        yield from self._webhooks()
        if self.health.instance is not None:
            yield from self._instance()

    def _spend(self) -> Iterator[Metric]:
        """The budget day's money and its alerts."""
        health = self.health
        day = health.day
        yield _gauge("up", "1 when status is ok, 0 when degraded", 1 if health.ok else 0)
        yield _daily(day, "daily_spend_usd", "Spend of the budget day in USD", health.daily_spend)
        yield _daily(day, "daily_cap_usd", "Daily spend cap in USD", health.daily_cap)
        yield _daily(day, "remaining_usd", "Cap minus spend, never negative", health.remaining)
        yield _daily(
            day, "utilization_ratio", "Spend divided by cap (0.8 = 80%)", health.utilization
        )
        yield _daily(day, "dispatches", "Costs counted today", health.dispatches)
        sent = GaugeMetricFamily(
            _PREFIX + "alert_sent",
            "1 when the alert for this threshold was sent today",
            labels=["day", "threshold"],
        )
        for threshold in health.alert_thresholds:
            sent.add_metric([day, str(threshold)], 1 if threshold in health.alerts_sent else 0)
        yield sent
        yield _daily(
            day, "reserved_usd", "Admitted estimates not yet settled or expired", health.reserved
        )
        yield _daily(
            day, "burn_rate_5m_usd_per_hour", "Spend per hour, last 5 minutes", health.burn_rate_5m
        )
        yield _daily(
            day,
            "burn_rate_60m_usd_per_hour",
            "Spend per hour, last 60 minutes",
            health.burn_rate_60m,
        )
        yield _daily(
            day,
            "projected_spend_usd",
            "Spend at midnight at the 60-minute rate",
            health.projected_spend,
        )

    def _progress(self) -> Iterator[Metric]:
        """Costs, cycles and patches as they go by; subscribers; uptime."""
        health = self.health
        yield _gauge("seq", "Sequence number of the last accepted cost", health.seq)
        yield _daily(health.day, "cycles", "Heartbeat cycles counted today", health.cycle_count)
        yield _gauge(
            "cycles_until_persist",
            "Cycles until the next budget patch",
            health.cycles_until_persist,
        )
        yield _gauge(
            "last_persist_timestamp_seconds",
            "Unix time of this process's last budget patch (0 = none yet)",
            _timestamp(health.last_persist_at),
        )
        yield _gauge(
            "last_cycle_timestamp_seconds",
            "Unix time of the last heartbeat cycle this process counted (0 = none yet)",
            _timestamp(health.last_cycle_at),
        )
        yield _gauge("subscribers", "Live subscribers", health.subscribers)
        yield _gauge("uptime_seconds", "Seconds since the budget actor started", health.uptime_s)

    def _store(self) -> Iterator[Metric]:
        """The store: up or not, how far behind, how fast (histograms)."""
        health = self.health
        store_ok = GaugeMetricFamily(
            _PREFIX + "store_ok", "1 when the last store write succeeded", labels=["store"]
        )
        store_ok.add_metric([health.store], 1 if health.store_ok else 0)
        yield store_ok
        yield _gauge("pending_costs", "Accepted costs not yet durable in the store", health.pending)
        yield _gauge(
            "persist_latency_seconds",
            "Duration of the last store commit (see store_commit_duration_seconds)",
            health.persist_latency_s,
        )
        yield _gauge(
            "store_lag_seconds", "How far behind the store is (0: caught up)", health.store_lag_s
        )
        yield _gauge(
            "spill_quarantined",
            "Spill file lines that were not valid costs, set aside uncounted",
            health.spill_quarantined,
        )
        if self.stats is not None:
            yield _histogram(
                "ack_latency_seconds",
                "Seconds from the budget actor counting a cost to the cost being durable"
                " (its ack may leave)",
                self.stats.ack_latency,
            )
            yield _histogram(
                "store_commit_duration_seconds",
                "Seconds each successful store transaction took",
                self.stats.commit_duration,
            )

    def _counters(self) -> Iterator[Metric]:
        """Counters of costs, duplicates, restarts and error replies."""
        health = self.health
        yield CounterMetricFamily(
            _PREFIX + "costs", "Costs accepted (the last sequence number)", value=health.seq
        )
        yield CounterMetricFamily(
            _PREFIX + "duplicates",
            "Duplicates acknowledged without counting, since the actor started",
            value=health.duplicates,
        )
        restarts = CounterMetricFamily(
            _PREFIX + "restarts", "Restarts of a supervised task", labels=["child"]
        )
        for child, count in sorted(health.restarts.items()):
            restarts.add_metric([child], count)
        yield restarts
        errors = CounterMetricFamily(
            _PREFIX + "errors", "Error replies sent, by code", labels=["code"]
        )
        for code, count in sorted(self.errors.items()):
            errors.add_metric([code], count)
        yield errors

    def _webhooks(self) -> Iterator[Metric]:
        """Alert webhooks (zeros when none is configured)."""
        webhooks = self.stats.webhooks if self.stats is not None else None
        yield _gauge(
            "webhooks_pending",
            "Alert webhook deliveries not yet answered by a 2xx (0 without webhooks)",
            webhooks.pending if webhooks is not None else 0,
        )
        yield CounterMetricFamily(
            _PREFIX + "webhook_deliveries",
            "Alert webhook deliveries answered by a 2xx",
            value=webhooks.delivered if webhooks is not None else 0,
        )
        yield CounterMetricFamily(
            _PREFIX + "webhook_failures",
            "Alert webhook attempts that failed (each retry counts)",
            value=webhooks.failures if webhooks is not None else 0,
        )

    def _instance(self) -> Iterator[Metric]:
        """A shared budget: daily_spend_usd is global; this is our share."""
        health = self.health
        labels = ["day", "instance"]
        share = GaugeMetricFamily(
            _PREFIX + "instance_spend_usd", "This instance's share of the spend", labels=labels
        )
        share.add_metric([health.day, health.instance or ""], float(health.instance_spend or 0))
        yield share
        counted = GaugeMetricFamily(
            _PREFIX + "instance_dispatches", "Costs counted here today", labels=labels
        )
        counted.add_metric([health.day, health.instance or ""], health.instance_dispatches or 0)
        yield counted
        yield _daily(
            health.day,
            "instances",
            "Instances with a share of today's spend",
            health.instances or 0,
        )
        if health.sync_age_s is not None:
            yield _gauge(
                "sync_age_seconds",
                "Age of this instance's view of the other instances' spend",
                health.sync_age_s,
            )


def _gauge(name: str, help_text: str, value: float | Decimal | int) -> GaugeMetricFamily:
    return GaugeMetricFamily(_PREFIX + name, help_text, value=float(value))


def _daily(day: str, name: str, help_text: str, value: float | Decimal | int) -> GaugeMetricFamily:
    # Figures of the budget day carry it as a label: a new series starts at
    # midnight (aggregate it away in rules: max without (day)).
    family = GaugeMetricFamily(_PREFIX + name, help_text, labels=["day"])
    family.add_metric([day], float(value))
    return family


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [
        ("+Inf" if math.isinf(bound) else repr(bound), float(count))
        for bound, count in histogram.cumulative()
    ]
    return HistogramMetricFamily(
        _PREFIX + name, help_text, buckets=buckets, sum_value=histogram.sum
    )


def _timestamp(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def render(
    health: Health,
    errors: Mapping[str, int] | None = None,
    stats: ServiceStats | None = None,
) -> str:
    """The Prometheus text format (0.0.4) of one scrape."""
    return generate_latest(BudgetCollector(health, stats, errors)).decode()


def exposition(
    health: Health,
    stats: ServiceStats | None,
    errors: Mapping[str, int] | None,
    accept: str,
) -> tuple[bytes, str]:
    """The body and content type for a scraper whose ``Accept`` header is
    ``accept``: OpenMetrics when it asks for ``application/openmetrics-text``,
    otherwise the Prometheus text format."""
    encoder, content_type = choose_encoder(accept)
    return encoder(BudgetCollector(health, stats, errors)), content_type
