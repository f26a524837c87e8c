"""``shared-admit``: global admissions per second, and the cap they keep.

Three instances sharing one PostgreSQL budget, opened in this process
(``open_budget`` with three instance ids, so no WebSocket cost is measured),
and ``ADMITTERS`` tasks spread over them, each admitting one small estimate
after another for ``WINDOW_S`` seconds and settling it with its cost on the
next instance. Every admission is one serialised transaction in PostgreSQL
(a per-day advisory lock), which is what this measures.
"""

from __future__ import annotations

import time
from decimal import Decimal

import psycopg
import trio

from budget_actor import make_config, open_budget

from ._support import pg_schema, pg_skipped
from .rows import Row

ADMITTERS = 50
WINDOW_S = 4.0
# Large enough that the cap is not reached in the window: this measures the
# admission path, not refusals.
CAP = "1000000"
ESTIMATE = Decimal("0.01")


async def _run(url: str) -> tuple[int, int, Decimal, Decimal]:
    config = make_config(daily_cap=CAP, sync_interval_s=0.2)
    admitted = costs = 0
    async with (
        open_budget(config, database=url, instance="a", spill=False) as a,
        open_budget(config, database=url, instance="b", spill=False) as b,
        open_budget(config, database=url, instance="c", spill=False) as c,
    ):
        instances = [a, b, c]
        deadline = time.perf_counter() + WINDOW_S

        async def admitter(k: int) -> None:
            nonlocal admitted, costs
            i = 0
            while time.perf_counter() < deadline:
                dispatch_id = f"adm-{k}-{i}"
                answer = await instances[k % 3].admit(dispatch_id, ESTIMATE)
                if not answer.allowed:
                    raise RuntimeError(f"refused below the cap: {answer}")
                admitted += 1
                await instances[(k + 1) % 3].record(dispatch_id, ESTIMATE)
                costs += 1
                i += 1

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(ADMITTERS):
                nursery.start_soon(admitter, k)
        elapsed = time.perf_counter() - start
        health = await a.health()
    rate = int(admitted / elapsed)
    return rate, costs, health.reserved, health.daily_spend


def shared_admit() -> list[Row]:
    """Global admissions/s: 50 admitters on 3 instances sharing one PostgreSQL budget."""
    try:
        with pg_schema() as url:
            rate, costs, reserved, spend = trio.run(_run, url)
    except psycopg.OperationalError as exc:
        return [pg_skipped("shared-admit", exc)]
    note = (
        f"{ADMITTERS} tasks over 3 in-process instances on one PostgreSQL for {WINDOW_S:.0f} s;"
        " each admits one estimate, then records its cost on the next instance, then again."
        f" {costs:,} costs settled; at the end the spend was {spend} and {reserved} still"
        " reserved (each admission counted once, as reserved or as spent). Every admission"
        " is one transaction under a per-day advisory lock, serialised across instances; the"
        " costs' group commits run beside them. Each instance's coordinator decides one"
        f" admission at a time on its own connection ({1000 * 3 / max(rate, 1):.1f} ms each"
        " here, about 7 round trips and a commit), so this is a per-instance bound more than"
        " PostgreSQL's. One 2-core machine runs the instances and PostgreSQL."
    )
    return [
        Row(
            scenario="shared-admit",
            figure=f"global admissions/s, {ADMITTERS} admitters on 3 instances",
            value=float(rate),
            unit="admits/s",
            note=note,
        )
    ]
