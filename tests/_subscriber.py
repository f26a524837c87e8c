"""A subscriber process for the crash tests: prints every spend it sees.

    python tests/_subscriber.py URL BACKEND

One line per update: ``spend SEQ DAILY_SPEND`` (or ``alert THRESHOLD``),
flushed at once. It rides through the service's restarts by itself.
"""

from __future__ import annotations

import sys

import anyio

from budget_actor.client import BudgetClient, Spend


async def main(url: str) -> None:
    async with BudgetClient(url) as client:
        async for update in client.subscribe():
            if isinstance(update, Spend):
                print(f"spend {update.seq} {update.daily_spend}", flush=True)
            else:
                print(f"alert {update.threshold}", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], backend=sys.argv[2])
