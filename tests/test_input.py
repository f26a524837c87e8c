"""Strict input (PROTOCOL.md, "Additions of 2026-12-02", "Input rules";
issue 13, findings 3, 5 and the hostile-frame cost of 8).

- A frame whose JSON object repeats a key is refused (``invalid_message``):
  msgspec keeps the last value without a word, so ``"usd":"0.01","usd":"999"``
  counted 999.
- ``dispatch_id``, ``model`` and ``agent`` are refused (``invalid_cost``) when
  blank or holding a control, format (Cf: U+202E, U+200B, ...), line or
  paragraph separator character; the in-process API refuses alike (one rule,
  in core/cost.py).
- ``admit``'s ``estimate_usd`` must be greater than zero; a reservation is
  renewed at most ``MAX_RENEWALS`` times and at most ``MAX_OPEN_RESERVATIONS``
  are open at once, on SQLite (the ledger) and PostgreSQL (the shared store).
- An observer's ``cost`` is refused as ``forbidden`` before its fields are
  checked, and a hostile frame costs about as much to refuse as a normal one
  to parse (counted in Python lines executed, not in wall-clock time).
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from types import FrameType
from typing import Any

import pytest
import trio

from budget_actor import InvalidCost, make_config, open_budget
from budget_actor.core import admission
from budget_actor.core.admission import MAX_OPEN_RESERVATIONS, MAX_RENEWALS
from budget_actor.core.cost import REFUSED_CATEGORIES, _refused_char, make_cost
from budget_actor.core.ledger import Ledger
from budget_actor.core.wire import WireError, decode, repeated_key
from budget_actor.net.server import ServerOptions, serve

from ._client import connect

MAX = Decimal("1000")
T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)


def refused(frame: str) -> WireError:
    with pytest.raises(WireError) as caught:
        decode(frame, max_cost=MAX)
    return caught.value


# --------------------------------------------------------------------------
# Repeated keys
# --------------------------------------------------------------------------

REPEATS = [
    # The case: the second usd was counted.
    ('{"type":"cost","dispatch_id":"d","usd":"0.01","usd":"999"}', "usd"),
    ('{"type":"cost","dispatch_id":"d","usd":"0.01","\\u0075sd":"999"}', "usd"),
    ('{"type": "cost", "usd": 1, "dispatch_id": "d", "usd" : 2}', "usd"),
    ('{"type":"cost","dispatch_id":"a","dispatch_id":"b","usd":"1"}', "dispatch_id"),
    ('{"type":"cost","dispatch_id":"d","usd":"1","model":null,"model":"m"}', "model"),
    ('{"type":"cost","dispatch_id":"d:1","usd":"1","agent":"a:b","agent":"c"}', "agent"),
    ('{"type":"cost","type":"cost","dispatch_id":"d","usd":"1"}', "type"),
    ('{"type":"admit","dispatch_id":"d","estimate_usd":"1","estimate_usd":"2"}', "estimate_usd"),
    ('{"type":"health","id":"a","id":"b"}', "id"),
    ('{"type":"subscribe","type":"subscribe"}', "type"),
]


@pytest.mark.parametrize(("frame", "key"), REPEATS)
def test_a_frame_that_repeats_a_key_is_refused(frame: str, key: str) -> None:
    error = refused(frame)
    assert error.code == "invalid_message", error.detail
    assert f"`{key}`" in error.detail


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"cost","dispatch_id":"d:1","usd":"1","model":"a:b:c","agent":"x"}',
        '{"type":"cost","dispatch_id":"d","usd":"1","model":null}',
        '{"type":"cost","dispatch_id":"\\"usd\\":","usd":"1","model":"\\"usd\\": 2"}',
        '{"type":"cost","dispatch_id":"{\\"a\\":1,\\"a\\":2}","usd":"1"}',
    ],
)
def test_colons_and_braces_inside_texts_are_not_keys(frame: str) -> None:
    decode(frame, max_cost=MAX)


@pytest.mark.parametrize(
    ("frame", "code", "said"),
    [
        (
            '{"type":"costs","costs":[{"dispatch_id":"a","usd":"1"},'
            '{"dispatch_id":"b","usd":"0.01","usd":"999"}]}',
            "invalid_cost",
            "costs[1]: key `usd`",
        ),
        (
            '{"type":"costs","costs":[{"dispatch_id":"a","usd":"1"}],'
            '"costs":[{"dispatch_id":"b","usd":"999"}]}',
            "invalid_message",
            "key `costs`",
        ),
        (
            '{"type":"costs","costs":[{"dispatch_id":"a\u202e","usd":"1"}]}',
            "invalid_cost",
            "costs[0]: `dispatch_id`",
        ),
    ],
)
def test_a_batch_is_held_to_the_same_rules(frame: str, code: str, said: str) -> None:
    error = refused(frame)
    assert (error.code, said in error.detail) == (code, True), error.detail


def test_a_batch_with_colons_in_its_texts_is_fine() -> None:
    items = [{"dispatch_id": f"b:{i}", "usd": "0.01", "model": "a:b"} for i in range(300)]
    batch = decode(json.dumps({"type": "costs", "costs": items}), max_cost=MAX)
    assert len(batch.costs) == 300  # type: ignore[union-attr]


def test_repeated_key_looks_into_every_object() -> None:
    assert repeated_key('{"a":1,"b":{"a":2}}') is None
    assert repeated_key('{"a":{"x":1,"x":2}}') == "x"
    assert repeated_key('[{"a":1},{"a":2}]') is None
    assert repeated_key('{"costs":[{"usd":1,"usd":2}]}') == "usd"


async def test_a_repeated_usd_is_not_counted(sqlite_url: str) -> None:
    async with open_budget(make_config(), database=sqlite_url) as budget:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve, options=ServerOptions()), budget, "127.0.0.1", 0
            )
            async with connect(f"ws://127.0.0.1:{port}/ws") as conn:
                error = await conn.request(REPEATS[0][0], "error")
                assert error["code"] == "invalid_message"
                ack = await conn.cost("d", "0.01")  # the id was not taken
                assert ack["duplicate"] is False
                assert (await conn.health())["daily_spend"] == "0.01"
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Text fields
# --------------------------------------------------------------------------

BAD_TEXTS = [
    ("right-to-left override", "invoice\u202egpj.exe"),
    ("zero-width space", "d\u200b1"),
    ("line separator", "d\u20281"),
    ("paragraph separator", "d\u20291"),
    ("byte order mark", "\ufeffd1"),
    ("soft hyphen", "d\u00ad1"),
    ("C1 next line", "d\u00851"),
    ("tag character", "d\U000e0041"),
    ("a single space", " "),
    ("spaces and a tab", " \t "),
    ("no-break spaces", "\u00a0\u3000"),
    ("empty", ""),
]


@pytest.mark.parametrize("field", ["dispatch_id", "model", "agent"])
@pytest.mark.parametrize(("case", "text"), BAD_TEXTS, ids=[c for c, _ in BAD_TEXTS])
def test_blank_or_invisible_texts_are_refused_as_invalid_cost(
    field: str, case: str, text: str
) -> None:
    fields: dict[str, Any] = {"dispatch_id": "d", "usd": "1", field: text}
    error = refused(json.dumps({"type": "cost", **fields}))
    assert error.code == "invalid_cost", error.detail
    assert f"`{field}`" in error.detail
    with pytest.raises(InvalidCost) as in_process:
        make_cost(**fields, max_cost=MAX)
    assert (in_process.value.code, in_process.value.detail) == (error.code, error.detail)


@pytest.mark.parametrize(
    "text", ["café", "模型-3", "agent 🎉", "a\u00a0b", "gpt-4o:2024", "x" * 256]
)
def test_ordinary_texts_are_accepted(text: str) -> None:
    cost = decode(
        json.dumps({"type": "cost", "dispatch_id": text, "usd": "1", "model": text}), max_cost=MAX
    )
    assert cost.dispatch_id == text  # type: ignore[union-attr]


def test_the_refused_characters_are_exactly_the_contracts_categories() -> None:
    """Every code point: the fast checks agree with Python's Unicode database."""
    wrong = [
        f"U+{cp:04X}"
        for cp in range(sys.maxunicode + 1)
        if (_refused_char(chr(cp)) is not None)
        != (unicodedata.category(chr(cp)) in REFUSED_CATEGORIES)
    ]
    assert wrong == []


async def test_the_in_process_api_refuses_alike(sqlite_url: str) -> None:
    async with open_budget(make_config(), database=sqlite_url) as budget:
        for text in ("x\u202ey", " ", "a\u2028b"):
            with pytest.raises(InvalidCost):
                await budget.record(text, "1")
            with pytest.raises(InvalidCost):
                await budget.record("ok", "1", model=text)
            with pytest.raises(InvalidCost):
                await budget.admit(text, "1")
        assert (await budget.health()).dispatches == 0


# --------------------------------------------------------------------------
# Admissions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("estimate", ['"0"', "0", '"0.000"', "0e5", "-0"])
def test_an_estimate_of_zero_is_refused(estimate: str) -> None:
    error = refused(f'{{"type":"admit","dispatch_id":"d","estimate_usd":{estimate}}}')
    assert error.code == "invalid_cost" and "estimate_usd" in error.detail


async def test_zero_estimates_no_longer_pass_over_the_cap(sqlite_url: str) -> None:
    """The issue's case: an estimate of 0 was always allowed, even over the cap."""
    async with open_budget(make_config(daily_cap="1.00"), database=sqlite_url) as budget:
        await budget.record("spent", "2")
        with pytest.raises(InvalidCost):
            await budget.admit("free", "0")
        assert not (await budget.admit("small", "0.000001")).allowed
        assert (await budget.health()).reserved == 0


def test_a_reservation_is_renewed_at_most_max_renewals_times() -> None:
    config = make_config(daily_cap="10.00", reservation_ttl_s=600)
    ledger = Ledger(config, T0)
    now = T0
    for _ in range(MAX_RENEWALS + 1):  # the first admission, then the renewals
        assert ledger.admit(now, "held", Decimal("9")).value.allowed
        now += timedelta(minutes=9)
    refused = ledger.admit(now, "held", Decimal("9")).value
    assert not refused.allowed and "renewed" in (refused.reason or "")
    # It still holds until its last expiry, then the cap is free again.
    assert not ledger.admit(now, "other", Decimal("2")).value.allowed
    later = now + timedelta(minutes=1)
    assert ledger.admit(later, "other", Decimal("2")).value.allowed


def test_open_reservations_are_capped() -> None:
    ledger = Ledger(make_config(daily_cap="1000000"), T0)
    for i in range(MAX_OPEN_RESERVATIONS):
        assert ledger.admit(T0, f"r{i}", Decimal("0.01")).value.allowed
    refused = ledger.admit(T0, "one-more", Decimal("0.01")).value
    assert not refused.allowed and "open" in (refused.reason or "")
    # Renewing one that holds is still possible; settling one makes room.
    assert ledger.admit(T0, "r0", Decimal("0.02")).value.allowed
    ledger.record(T0, make_cost("r1", "0.01", max_cost=MAX))
    assert ledger.admit(T0, "one-more", Decimal("0.01")).value.allowed


async def test_the_shared_store_bounds_reservations_too(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "MAX_OPEN_RESERVATIONS", 3)
    config = make_config(daily_cap="100.00", sync_interval_s=0.05)
    async with (
        open_budget(config, database=pg_url, instance="one", spill=False) as one,
        open_budget(config, database=pg_url, instance="two", spill=False) as two,
    ):
        for _ in range(MAX_RENEWALS + 1):
            assert (await one.admit("held", "10")).allowed
        renewed = await two.admit("held", "10")  # the count is the row's, on any instance
        assert not renewed.allowed and "renewed" in (renewed.reason or "")
        for i in range(2):
            assert (await one.admit(f"more-{i}", "1")).allowed
        full = await one.admit("too-many", "1")
        assert not full.allowed and "open" in (full.reason or "")
        # The cap is per instance: another instance has its own.
        assert (await two.admit("too-many", "1")).allowed


# --------------------------------------------------------------------------
# Role first, and the cost of refusing
# --------------------------------------------------------------------------

OBSERVER_TOKEN = "observer-0123456789abcdef"
DISPATCHER_TOKEN = "dispatcher-0123456789abcdef"


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"cost","dispatch_id":"d","usd":"NaN"}',
        '{"type":"cost","dispatch_id":"d\u202e","usd":"1"}',
        '{"type":"cost","dispatch_id":"d","usd":"1","usd":"2"}',
        '{"type":"cost","dispatch_id":"d","usd":' + "[" * 3000 + "]" * 3000 + "}",
        '{"type":"admit","dispatch_id":"d","estimate_usd":"0"}',
        '{"type":"cycle","extra":1}',
    ],
)
async def test_an_observer_is_refused_for_its_role_before_its_fields(
    sqlite_url: str, frame: str
) -> None:
    from budget_actor.core.access import Access

    access = Access(dispatcher_token=DISPATCHER_TOKEN, observer_token=OBSERVER_TOKEN)
    async with open_budget(make_config(), database=sqlite_url) as budget:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve, options=ServerOptions(access=access)), budget, "127.0.0.1", 0
            )
            url = f"ws://127.0.0.1:{port}/ws?token={OBSERVER_TOKEN}"
            async with connect(url) as conn:
                error = await conn.request(frame, "error")
                assert error["code"] == "forbidden", error
            nursery.cancel_scope.cancel()


def _python_lines(call: Callable[[], object]) -> int:
    """Lines of budget_actor's Python code that ``call`` executes: the work
    done in Python rather than in msgspec's or re's C code. Deterministic,
    unlike a stopwatch."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if "budget_actor" not in frame.f_code.co_filename:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    except WireError:
        pass
    finally:
        sys.settrace(None)
    return count


HOSTILE = [
    (
        "60 KiB of spaces, then nesting",
        "{" + " " * 55_000 + '"model": ' + "[" * 4000 + "]" * 4000 + "}",
    ),
    (
        "a long text, then nesting",
        '{"agent":"' + "a" * 55_000 + '","model":' + "[" * 4000 + "]" * 4000 + "}",
    ),
    ("nested 5,000 deep", '{"type":' + '{"a":' * 5000 + "1" + "}" * 5001),
    ("usd repeated 6,000 times", '{"type":"cost","dispatch_id":"d"' + ',"usd":"1"' * 6000 + "}"),
    (
        "60 KiB of colons in a text",
        '{"type":"cost","dispatch_id":"d","usd":"1","model":"' + ":" * 60_000 + '"}',
    ),
]


@pytest.mark.parametrize(("case", "frame"), HOSTILE, ids=[c for c, _ in HOSTILE])
def test_refusing_a_hostile_frame_takes_no_more_python_than_a_normal_one(
    case: str, frame: str
) -> None:
    """Before, naming the field of a deep frame walked it character by
    character in Python: 60 KiB of spaces before the nesting cost ~1,000
    times a normal frame. Now the Python work is a constant, about that of a
    normal cost (one whose model has a colon, so it is scanned for repeated
    keys too), whatever the frame's size: the rest is msgspec's and str's C."""
    assert len(frame.encode()) <= 64 * 1024
    normal = json.dumps({"type": "cost", "dispatch_id": "d-1", "usd": "0.01", "model": "a:m"})
    baseline = _python_lines(lambda: decode(normal, max_cost=MAX))
    hostile = _python_lines(lambda: decode(frame, max_cost=MAX))
    assert hostile <= 3 * baseline, (case, hostile, baseline)
