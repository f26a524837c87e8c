"""Figures gathered where they are produced, for ``GET /metrics``.

One :class:`ServiceStats` lives as long as the service (it outlives restarts
of the actor and its children, so the histograms keep counting). Everything
runs on the event loop's thread, so plain attributes need no lock.
"""

from __future__ import annotations

from ..core.histogram import Histogram


class ServiceStats:
    def __init__(self) -> None:
        #: From the budget actor counting a cost to the cost being durable
        #: (in the store, or in the spill file during an outage): when its
        #: ack may leave. Observed by the persister, once per group of costs
        #: that the actor counted in one wake-up.
        self.ack_latency = Histogram()
        #: Duration of each successful store transaction of the persister.
        self.commit_duration = Histogram()
