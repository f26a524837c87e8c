"""``Budget.record_many``: the in-process twin of the ``costs`` frame.

All or nothing on bad input, one receipt per item in order, dedupe within
the batch and against what was counted before (also after a restart), and
durable before it returns.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest

from budget_actor import InvalidCost, Receipt, make_config, open_budget
from budget_actor.core.wire import MAX_BATCH_ITEMS

from ._helpers import rows

CONFIG = make_config(daily_cap="10.00")


async def test_receipts_in_order_with_duplicates_and_durable_on_return(database_url: str) -> None:
    async with open_budget(CONFIG, database=database_url) as budget:
        before = await budget.record("m-0", "0.05")
        receipts = await budget.record_many(
            [
                {"dispatch_id": "m-1", "usd": "0.10", "model": "x", "input_tokens": 3},
                {"dispatch_id": "m-2", "usd": Decimal("0.20"), "agent": "a"},
                {"dispatch_id": "m-1", "usd": "0.10"},  # again, inside the batch
                {"dispatch_id": "m-0", "usd": "0.05"},  # counted before the batch
                {"dispatch_id": "m-3", "usd": 1, "output_tokens": 7},
            ]
        )
        assert [r.dispatch_id for r in receipts] == ["m-1", "m-2", "m-1", "m-0", "m-3"]
        assert [r.duplicate for r in receipts] == [False, False, True, True, False]
        first, second, again, old, third = receipts
        assert again.seq == first.seq and old.seq == before.seq
        assert before.seq < first.seq < second.seq < third.seq
        # Durable when it returns: the journal already holds every new row.
        journal = rows(database_url, "SELECT dispatch_id, usd FROM budget_journal ORDER BY seq")
        assert [(d, Decimal(str(u))) for d, u in journal] == [
            ("m-0", Decimal("0.05")),
            ("m-1", Decimal("0.10")),
            ("m-2", Decimal("0.20")),
            ("m-3", Decimal("1")),
        ]
        health = await budget.health()
        assert health.daily_spend == Decimal("1.35") and health.dispatches == 4
    # After a restart the ids are still known: the whole batch comes back as
    # duplicates with the original seqs, and nothing is added.
    async with open_budget(CONFIG, database=database_url) as budget:
        resent = await budget.record_many(
            [{"dispatch_id": "m-2", "usd": "0.20"}, {"dispatch_id": "m-3", "usd": "1"}]
        )
        assert resent == [Receipt("m-2", second.seq, True), Receipt("m-3", third.seq, True)]
        assert (await budget.health()).daily_spend == Decimal("1.35")


@pytest.mark.parametrize(
    ("costs", "message"),
    [
        ([], "1 to 1,000 items"),
        ([{"dispatch_id": f"x-{i}", "usd": "0.01"} for i in range(MAX_BATCH_ITEMS + 1)], "1,001"),
        ([{"dispatch_id": "ok", "usd": "0.01"}, {"dispatch_id": "bad", "usd": "-1"}], "costs[1]"),
        ([{"dispatch_id": "ok", "usd": "0.01"}, {"dispatch_id": "f", "usd": 0.5}], "costs[1]"),
        ([{"dispatch_id": "ok", "usd": "0.01", "colour": "red"}], "unknown field 'colour'"),
        ([{"usd": "0.01"}], "costs[0].dispatch_id is missing"),
        ([{"dispatch_id": "ok", "usd": "0.01"}, ("no", "mapping")], "costs[1] must be a mapping"),
        ({"dispatch_id": "ok", "usd": "0.01"}, "sequence of mappings"),
    ],
)
async def test_bad_input_is_refused_whole_and_counts_nothing(
    sqlite_url: str, costs: Any, message: str
) -> None:
    async with open_budget(CONFIG, database=sqlite_url) as budget:
        with pytest.raises(InvalidCost, match=re.escape(message)) as refused:
            await budget.record_many(costs)
        assert refused.value.code == "invalid_cost"  # as for a refused `costs` frame
        health = await budget.health()
        assert health.dispatches == 0 and health.daily_spend == Decimal(0)
        # The ids of the refused batch were not taken: they count when sent right.
        receipt = await budget.record("ok", "0.01")
        assert not receipt.duplicate
    assert rows(sqlite_url, "SELECT dispatch_id FROM budget_journal") == [("ok",)]
