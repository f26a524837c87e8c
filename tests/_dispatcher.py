"""A dispatcher process for the crash tests: enqueues costs through
``BudgetClient`` with an outbox, and records each promise it was given.

    python tests/_dispatcher.py URL OUTBOX LOG BACKEND TOTAL [CHUNK] [PACE_S]

Costs ``d-0`` .. ``d-{TOTAL-1}``, amount :func:`amount`. CHUNK costs are
enqueued concurrently (the outbox writes them in one fsync), then their ids
are appended to LOG: a line in LOG means ``enqueue`` returned for that id, so
the cost must be counted. Started again after a kill, it goes on after the
last id in LOG (an id enqueued but not yet logged is enqueued again: the
service counts it once). While a file LOG.pause exists it waits before its
next chunk (so that a test can hold it at a point of its choosing). At the
end it flushes and prints ``done``.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import anyio

from budget_actor.client import BudgetClient


def amount(i: int) -> Decimal:
    return Decimal(i % 9 + 1) / 1000


def promised(log: Path) -> int:
    """Ids already logged (a torn last line, from a kill, does not count)."""
    if not log.exists():
        return 0
    text = log.read_text()
    return text.count("\n")


async def main(url: str, outbox: str, log_path: str, total: int, chunk: int, pace: float) -> None:
    log = Path(log_path)
    pause = Path(f"{log_path}.pause")
    start = promised(log)
    async with BudgetClient(url, outbox=outbox) as client:
        with log.open("a") as out:
            for first in range(start, total, chunk):
                while pause.exists():
                    await anyio.sleep(0.02)
                ids = range(first, min(first + chunk, total))
                async with anyio.create_task_group() as tasks:
                    for i in ids:
                        tasks.start_soon(client.enqueue, f"d-{i}", amount(i))
                out.write("".join(f"d-{i}\n" for i in ids))
                out.flush()
                await anyio.sleep(pace)
        await client.flush()
    print("done", flush=True)


if __name__ == "__main__":
    url, outbox, log_path, backend, total = sys.argv[1:6]
    chunk = int(sys.argv[6]) if len(sys.argv) > 6 else 25
    pace = float(sys.argv[7]) if len(sys.argv) > 7 else 0.02
    anyio.run(main, url, outbox, log_path, int(total), chunk, pace, backend=backend)
