"""One Cost value, built by one function, whichever way a cost arrives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from budget_actor.core.cost import Cost, InvalidCost, make_cost
from budget_actor.core.records import JournalEntry
from budget_actor.core.wire import WireError, decode
from budget_actor.stores.spill import SpillFile

MAX = Decimal("1000")


def test_a_frame_and_the_in_process_api_build_the_same_cost() -> None:
    fields = {"dispatch_id": "d-1", "model": "m", "input_tokens": 3, "agent": "a"}
    from_frame = decode(json.dumps({"type": "cost", "usd": 0.5, **fields}), max_cost=MAX)
    for usd in (Decimal("0.5"), "0.5", msgspec.Raw(b'"0.5"'), msgspec.Raw(b"0.5")):
        assert make_cost(usd=usd, max_cost=MAX, **fields) == from_frame
    assert from_frame == Cost("d-1", Decimal("0.5"), "m", 3, None, "a")


@pytest.mark.parametrize(
    "fields",
    [
        {"dispatch_id": "", "usd": "1"},
        {"dispatch_id": 5, "usd": "1"},
        {"dispatch_id": "x" * 257, "usd": "1"},
        {"dispatch_id": "a\u009bb", "usd": "1"},
        {"dispatch_id": "d", "usd": "1", "model": "m\n"},
        {"dispatch_id": "d", "usd": "1", "agent": 7},
        {"dispatch_id": "d", "usd": "1", "input_tokens": -1},
        {"dispatch_id": "d", "usd": "1", "output_tokens": "12"},
        {"dispatch_id": "d", "usd": "1", "output_tokens": True},
        {"dispatch_id": "d", "usd": "NaN"},
        {"dispatch_id": "d", "usd": "1_0"},
        {"dispatch_id": "d", "usd": "-0.01"},
        {"dispatch_id": "d", "usd": "1000.01"},
    ],
)
def test_the_server_and_the_in_process_api_refuse_alike(fields: dict[str, object]) -> None:
    with pytest.raises(WireError) as on_wire:
        decode(json.dumps({"type": "cost", **fields}), max_cost=MAX)
    with pytest.raises(InvalidCost) as in_process:
        make_cost(**fields, max_cost=MAX)  # type: ignore[arg-type]
    assert (on_wire.value.code, on_wire.value.detail) == (
        in_process.value.code,
        in_process.value.detail,
    )


def test_a_journal_entry_holds_the_cost_it_was_given() -> None:
    from budget_actor.core.config import BudgetConfig
    from budget_actor.core.ledger import Ledger

    now = datetime(2026, 12, 1, 9, tzinfo=UTC)
    cost = make_cost("d-1", "0.25", model="m", max_cost=MAX)
    recorded = Ledger(BudgetConfig(), now).record(now, cost).value
    assert recorded.entry is not None and recorded.entry.cost is cost


def test_the_spill_file_reads_entries_that_earlier_versions_wrote_flat(tmp_path: Path) -> None:
    """An upgrade with costs waiting in the spill file must still drain them."""
    at = datetime(2026, 12, 1, 9, tzinfo=UTC)
    path = tmp_path / "budget.spill"
    flat = {
        "seq": 7,
        "day": "2026-12-01",
        "dispatch_id": "old-1",
        "usd": "0.125",
        "at": at.isoformat(),
        "model": "m",
        "agent": None,
        "input_tokens": 10,
        "output_tokens": None,
    }
    path.write_text(json.dumps(flat) + "\n")
    path.chmod(0o600)  # a spill file is refused otherwise
    spill = SpillFile(path)
    spill.open()
    new = JournalEntry(seq=8, day="2026-12-01", at=at, cost=Cost("new-1", Decimal("1")))
    spill.append([new])
    assert spill.read() == [
        JournalEntry(seq=7, day="2026-12-01", at=at, cost=Cost("old-1", Decimal("0.125"), "m", 10)),
        new,
    ]


def test_a_cost_read_back_is_judged_by_the_same_rules() -> None:
    from budget_actor.core.cost import validate

    good = make_cost("d-1", "0.5", model="m", max_cost=MAX)
    assert validate(good, max_cost=MAX) == good
    for bad in (Cost("d-1", Decimal("-1")), Cost("", Decimal(1)), Cost("d\n", Decimal(1))):
        with pytest.raises(InvalidCost):
            validate(bad, max_cost=MAX)
    with pytest.raises(InvalidCost, match="maximum"):
        validate(good, max_cost=Decimal("0.1"))
