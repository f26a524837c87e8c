"""Health figures in the Prometheus text exposition format (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from ..core.views import Health

_PREFIX = "budget"


def render(health: Health, errors: Mapping[str, int] | None = None) -> str:
    """``GET /metrics``: every health figure as a gauge (labelled with the day
    where it is the day's), plus counters; ``errors`` counts error replies by
    code (the server keeps them)."""
    day = health.day
    lines: list[str] = []

    def metric(kind: str, name: str, value: object, help_text: str, labels: str = "") -> None:
        full = f"{_PREFIX}_{name}"
        if not any(line.startswith(f"# HELP {full} ") for line in lines):
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
        lines.append(f"{full}{{{labels}}} {value}" if labels else f"{full} {value}")

    def gauge(name: str, value: object, help_text: str, labels: str = "") -> None:
        metric("gauge", name, value, help_text, labels)

    def counter(name: str, value: object, help_text: str, labels: str = "") -> None:
        metric("counter", name, value, help_text, labels)

    d = f'day="{day}"'
    gauge("up", 1 if health.ok else 0, "1 when status is ok, 0 when degraded")
    gauge(
        "daily_spend_usd", health.daily_spend, "Spend of the budget day in USD (exact decimal)", d
    )
    gauge("daily_cap_usd", health.daily_cap, "Daily spend cap in USD", d)
    gauge("remaining_usd", health.remaining, "Cap minus spend, never negative", d)
    gauge("utilization_ratio", health.utilization, "Spend divided by cap (0.8 = 80%)", d)
    gauge("dispatches", health.dispatches, "Costs counted today", d)
    gauge("seq", health.seq, "Sequence number of the last accepted cost")
    gauge("cycle_count", health.cycle_count, "Heartbeat cycles counted today", d)
    gauge("cycles_until_persist", health.cycles_until_persist, "Cycles until the next budget patch")
    for threshold in health.alert_thresholds:
        sent = 1 if threshold in health.alerts_sent else 0
        gauge(
            "alert_sent",
            sent,
            "1 when the alert for this threshold was sent today",
            f'{d},threshold="{threshold}"',
        )
    last = health.last_persist_at.timestamp() if health.last_persist_at else 0
    gauge(
        "last_persist_timestamp_seconds", last, "Unix time of the last budget patch (0 = none yet)"
    )
    gauge(
        "store_ok",
        1 if health.store_ok else 0,
        "1 when the last store write succeeded",
        f'store="{health.store}"',
    )
    gauge("pending_costs", health.pending, "Accepted costs not yet durable in the store")
    gauge("reserved_usd", health.reserved, "Admitted estimates not yet settled or expired", d)
    gauge("burn_rate_5m_usd_per_hour", health.burn_rate_5m, "Spend per hour, last 5 minutes", d)
    gauge("burn_rate_60m_usd_per_hour", health.burn_rate_60m, "Spend per hour, last 60 min", d)
    gauge("projected_spend_usd", health.projected_spend, "Spend at midnight at the 60-min rate", d)
    gauge("subscribers", health.subscribers, "Live subscribers")
    counter("costs_total", health.seq, "Costs accepted (the last sequence number)")
    counter("duplicates_total", health.duplicates, "Duplicates acknowledged, not counted")
    for child, count in sorted(health.restarts.items()):
        counter("restarts_total", count, "Restarts of a supervised task", f'child="{child}"')
    for code, count in sorted((errors or {}).items()):
        counter("errors_total", count, "Error replies sent, by code", f'code="{code}"')
    gauge("persist_latency_seconds", health.persist_latency_s, "Duration of the last store commit")
    gauge("store_lag_seconds", health.store_lag_s, "How far behind the store is (0: caught up)")
    gauge("uptime_seconds", health.uptime_s, "Seconds since the service started")
    if health.instance is not None:
        # Shared budget: daily_spend_usd above is global; this is our share.
        i = f'{d},instance="{_label(health.instance)}"'
        gauge("instance_spend_usd", health.instance_spend, "This instance's share of the spend", i)
        gauge("instance_dispatches", health.instance_dispatches, "Costs counted here today", i)
        gauge("instances", health.instances, "Instances with a share of today's spend", d)
        if health.sync_age_s is not None:
            gauge(
                "sync_age_seconds",
                health.sync_age_s,
                "Age of this instance's view of the other instances' spend",
            )
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped (an
    instance id given in process may contain anything)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
