"""Figures gathered where they are produced, for ``GET /metrics``.

One :class:`ServiceStats` lives as long as the service (it outlives restarts
of the actor and its children, so the histograms keep counting). Everything
runs on the event loop's thread, so plain attributes need no lock.
"""

from __future__ import annotations

from ..core.histogram import Histogram


class WebhookStats:
    """Alert webhooks, as the webhook child last saw them."""

    def __init__(self) -> None:
        #: Deliveries to the configured webhooks that no 2xx answered yet.
        self.pending = 0
        #: Since the service started: deliveries answered with a 2xx, and
        #: attempts that failed (each retry counts).
        self.delivered = 0
        self.failures = 0


class ServiceStats:
    def __init__(self) -> None:
        #: From the budget actor counting a cost to the cost being durable
        #: (in the store, or in the spill file during an outage): when its
        #: ack may leave. Observed by the persister, once per group of costs
        #: that the actor counted in one wake-up.
        self.ack_latency = Histogram()
        #: Duration of each successful store transaction of the persister.
        self.commit_duration = Histogram()
        #: Alert webhooks; None when none is configured.
        self.webhooks: WebhookStats | None = None
