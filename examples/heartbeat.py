"""A heartbeat loop on asyncio, shaped like the platform's ``CloudLuHeartbeat``.

The platform's heartbeat runs on asyncio: every beat it does its rounds and
reports a health section. This is its budget part, written against
:class:`budget_actor.client.BudgetClient` instead of hand-written WebSocket
code:

* every dispatch's cost goes in through :meth:`BudgetHeartbeat.record_dispatch`
  (``enqueue``: safe on return, fsync'd to the outbox, sent in batches in the
  background, resent after reconnects, counted once);
* every beat sends one ``cycle`` (the service writes the budget patch every
  ``persist_every`` cycles);
* the beat's health section comes from ``client.health()``, with the fields
  the platform shows: ``daily_spend``, ``daily_cap``, ``utilization_percent``,
  ``alert_sent``, ``remaining``, ``cycles_until_persist``.

When the service cannot be reached, costs keep going into the outbox and the
section says ``{"available": false, "reason": ..., "pending": N}`` instead of
figures, at once: the beat never waits for the service.

Run it against a service, with simulated dispatches::

    python examples/heartbeat.py ws://127.0.0.1:8765/ws --outbox heartbeat.outbox \\
        --interval 1 --beats 5 --simulate 3

Each beat prints its health section as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from decimal import Decimal
from typing import Any

from budget_actor.client import (
    BudgetClient,
    ClientError,
    ConnectionStatus,
    Health,
    ServiceUnavailable,
)

# How long a beat waits for the service's answers before reporting it
# unavailable: well inside one heartbeat interval.
HEALTH_TIMEOUT_S = 5.0
# At exit, how long to wait for the outbox to empty before leaving the rest
# there for the next start.
FLUSH_AT_EXIT_S = 5.0


def health_section(health: Health) -> dict[str, Any]:
    """The budget part of the platform's health report, from the service's
    health (amounts exact, as ``Decimal``)."""
    return {
        "available": True,
        "daily_spend": health.daily_spend,
        "daily_cap": health.daily_cap,
        "utilization_percent": round(health.utilization * 100, 1),
        "alert_sent": bool(health.alerts_sent),
        "remaining": health.remaining,
        "cycles_until_persist": health.cycles_until_persist,
    }


class BudgetHeartbeat:
    """The budget side of a heartbeat: costs in, one cycle and one health
    section per beat. Use it inside ``async with``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        outbox: str | None = None,
        interval_s: float = 30.0,
    ) -> None:
        self.interval_s = interval_s
        self.connection = ConnectionStatus("connecting")
        self.client = BudgetClient(
            url, token, outbox, timeout=HEALTH_TIMEOUT_S, on_connection=self._connection
        )
        self.beats = 0

    def _connection(self, status: ConnectionStatus) -> None:
        self.connection = status

    async def __aenter__(self) -> BudgetHeartbeat:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(None, None, None)

    async def record_dispatch(
        self, dispatch_id: str, usd: Decimal | str, *, model: str | None = None
    ) -> None:
        """Account one dispatch's cost; returns once it is safe (outbox or ack).
        Raises :class:`~budget_actor.client.InvalidCost` for a bad amount or id."""
        await self.client.enqueue(dispatch_id, usd, model=model)

    async def beat(self) -> dict[str, Any]:
        """One heartbeat: a cycle, then the health section."""
        self.beats += 1
        if not self.client.connected:
            # Do not hold up the beat: the client reconnects in the background.
            reason = self.connection.detail or self.connection.state
            return {"available": False, "reason": reason, "pending": self.client.pending}
        try:
            await self.client.cycle()
            return health_section(await self.client.health())
        except ServiceUnavailable as exc:
            return {"available": False, "reason": str(exc), "pending": self.client.pending}

    async def run(
        self, beats: int | None = None, simulate: int = 0, prefix: str = "heartbeat"
    ) -> None:
        """Beat every ``interval_s`` (``beats`` times, or forever), printing each
        health section as a JSON line; ``simulate`` dispatches per beat, with
        ids ``PREFIX-1``, ``PREFIX-2``, ... At the end it gives the client a
        moment to deliver what the outbox holds; what is left stays there for
        the next start."""
        dispatched = 0
        while beats is None or self.beats < beats:
            for _ in range(simulate):
                dispatched += 1
                await self.record_dispatch(
                    f"{prefix}-{dispatched}", simulated_cost(dispatched), model="simulated"
                )
            section = await self.beat()
            print(json.dumps({"beat": self.beats, "budget": section}, default=str), flush=True)
            await asyncio.sleep(self.interval_s)
        await self._deliver()
        if self.client.pending:
            print(f"{self.client.pending} costs wait in the outbox for the next start", flush=True)

    async def _deliver(self) -> None:
        """Wait (bounded) for the outbox to empty, unless the service is
        known to be down: then the costs wait there for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_AT_EXIT_S
        while self.client.pending and loop.time() < deadline:
            if self.connection.state == "disconnected":
                return
            await asyncio.sleep(0.05)
        if not self.client.pending:
            # Also deletes the acknowledged rows from the outbox.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.client.flush(), FLUSH_AT_EXIT_S)


def simulated_cost(n: int) -> Decimal:
    """The cost of simulated dispatch ``n``: a few cents, exact."""
    return Decimal("0.0125") * (n % 3 + 1)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--token", default=None)
    parser.add_argument("--outbox", default=None)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--beats", type=int, default=None)
    parser.add_argument("--simulate", type=int, default=0, help="dispatches per beat")
    parser.add_argument("--prefix", default="heartbeat", help="of the simulated dispatch ids")
    args = parser.parse_args(argv)
    try:
        async with BudgetHeartbeat(
            args.url, token=args.token, outbox=args.outbox, interval_s=args.interval
        ) as heartbeat:
            await heartbeat.run(args.beats, args.simulate, args.prefix)
    except ClientError as exc:
        print(f"heartbeat: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
