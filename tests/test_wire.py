"""The wire protocol, sans I/O: every frame decodes to a request or a precise error."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget_actor.core.cost import Cost
from budget_actor.core.wire import (
    CycleRequest,
    HealthRequest,
    SubscribeRequest,
    WireError,
    decode,
)

MAX = Decimal("1000")


def _cost(**fields: object) -> str:
    return json.dumps({"type": "cost", "dispatch_id": "d-1", "usd": "0.5", **fields})


def test_valid_requests() -> None:
    assert decode('{"type":"subscribe"}', max_cost=MAX) == SubscribeRequest()
    assert decode('{"type":"cycle"}', max_cost=MAX) == CycleRequest()
    assert decode('{"type":"health","id":"q1"}', max_cost=MAX) == HealthRequest(id="q1")
    cost = decode(_cost(model="m", input_tokens=10, output_tokens=0, agent="a"), max_cost=MAX)
    assert cost == Cost("d-1", Decimal("0.5"), "m", 10, 0, "a")


def test_a_json_number_is_read_exactly_from_its_text() -> None:
    request = decode('{"type":"cost","dispatch_id":"x","usd":0.045864}', max_cost=MAX)
    assert isinstance(request, Cost) and request.usd == Decimal("0.045864")
    huge_precision = '{"type":"cost","dispatch_id":"x","usd":0.100000000001}'
    assert decode(huge_precision, max_cost=MAX).usd == Decimal("0.100000000001")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("frame", "code", "names"),
    [
        ("not json", "invalid_message", "JSON"),
        ("[1,2]", "invalid_message", "object"),
        ('{"type":"nope"}', "invalid_message", "type"),
        ("{}", "invalid_message", "type"),
        ('{"type":"cost","usd":"1"}', "invalid_message", "dispatch_id"),
        ('{"type":"cost","dispatch_id":"x"}', "invalid_message", "usd"),
        (_cost(extra=1), "invalid_message", "extra"),
        (_cost(dispatch_id=5), "invalid_message", "dispatch_id"),
        (_cost(dispatch_id=""), "invalid_cost", "dispatch_id"),
        (_cost(dispatch_id="x" * 257), "invalid_message", "dispatch_id"),
        (_cost(dispatch_id="a\u0007b"), "invalid_cost", "dispatch_id"),
        (_cost(input_tokens=-1), "invalid_message", "input_tokens"),
        (_cost(output_tokens="12"), "invalid_message", "output_tokens"),
        (_cost(usd="NaN"), "invalid_cost", "usd"),
        (_cost(usd="Infinity"), "invalid_cost", "usd"),
        (_cost(usd="-0.01"), "invalid_cost", "usd"),
        (_cost(usd="abc"), "invalid_cost", "usd"),
        (_cost(usd="1_0"), "invalid_cost", "usd"),
        (_cost(usd=" 1"), "invalid_cost", "usd"),
        (_cost(usd=".5"), "invalid_cost", "usd"),
        (_cost(usd="0x10"), "invalid_cost", "usd"),
        (_cost(usd="sNaN"), "invalid_cost", "usd"),
        (_cost(usd=None), "invalid_cost", "usd"),
        (_cost(usd=[1]), "invalid_cost", "usd"),
        (_cost(usd="1e-65"), "invalid_cost", "usd"),
        (_cost(usd=True), "invalid_cost", "usd"),
        (_cost(usd="1000.01"), "invalid_cost", "usd"),
        ('{"type":"cost","dispatch_id":"x","usd":1e400}', "invalid_cost", "usd"),
        ('{"type":"cost","dispatch_id":"x","usd":' + "9" * 10_000 + "}", "invalid_cost", "usd"),
        ('{"type":"cost","dispatch_id":"x","usd":-0.01}', "invalid_cost", "usd"),
        ('{"type":' + '{"a":' * 5000 + "1" + "}" * 5001, "invalid_message", ""),
        ('{"type":"health","id":7}', "invalid_message", "id"),
    ],
)
def test_bad_frames_get_a_precise_error(frame: str, code: str, names: str) -> None:
    with pytest.raises(WireError) as caught:
        decode(frame, max_cost=MAX)
    assert caught.value.code == code
    assert names in caught.value.detail
    error = json.loads(caught.value.frame())
    assert error == {"type": "error", "code": code, "detail": caught.value.detail}


def test_binary_frames_are_refused() -> None:
    with pytest.raises(WireError, match="binary"):
        decode(b'{"type":"cycle"}', max_cost=MAX)


def test_negative_zero_is_zero() -> None:
    for frame in [
        '{"type":"cost","dispatch_id":"x","usd":"-0"}',
        '{"type":"cost","dispatch_id":"x","usd":-0.0}',
    ]:
        request = decode(frame, max_cost=MAX)
        assert isinstance(request, Cost) and str(request.usd) in {"0", "0.0"}


def test_amounts_are_encoded_in_plain_notation() -> None:
    from budget_actor.core.views import Spend
    from budget_actor.core.wire import encode

    spend = Spend(
        day="2026-12-01",
        daily_spend=Decimal("1E-7"),
        daily_cap=Decimal("1E+1"),
        remaining=Decimal("9.9999999"),
        utilization=0.0,
        dispatches=1,
        seq=1,
    )
    frame = json.loads(encode(spend))
    assert (frame["daily_spend"], frame["daily_cap"]) == ("0.0000001", "10")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_decode_is_total_on_arbitrary_text(frame: str) -> None:
    try:
        request = decode(frame, max_cost=MAX)
    except WireError as exc:
        assert exc.code in {"invalid_message", "invalid_cost"}
        return
    if isinstance(request, Cost):
        assert request.usd.is_finite() and 0 <= request.usd <= MAX


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["cost", "cycle", "health", "subscribe", "admit", "x"])},
        optional={
            "dispatch_id": json_values,
            "usd": json_values | st.decimals(allow_nan=True).map(str),
            "model": json_values,
            "id": json_values,
        },
    )
)
def test_decode_is_total_on_structured_junk(message: dict[str, object]) -> None:
    try:
        request = decode(json.dumps(message), max_cost=MAX)
    except WireError as exc:
        assert exc.detail
        return
    if isinstance(request, Cost):
        assert request.usd.is_finite() and 0 <= request.usd <= MAX
        assert isinstance(request.dispatch_id, str) and request.dispatch_id
