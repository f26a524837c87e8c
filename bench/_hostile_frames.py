"""``hostile-frames``: what refusing a hostile frame costs, beside a normal one.

Each frame goes through :func:`budget_actor.core.wire.decode` (everything the
connection's reader does with a frame before the actor sees it), in this
process, many times per round; the figure is the median of the rounds'
microseconds per frame. Hostile frames are up to the 64 KiB frame limit, so
they are compared with a *normal frame of the same size* (a valid ``health``
padded with whitespace, which msgspec must read through too) as well as with
a small ``cost``: the first ratio says whether the refusal costs more than
reading that many bytes at all, the second what a flood of them costs
against normal traffic.

Also: an observer's invalid ``cost``, refused by its ``type`` alone
(:func:`~budget_actor.core.wire.peek_type`) before any field is checked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal

from budget_actor.core.wire import WireError, decode, peek_type

from .rows import Row, median

ROUNDS = 5
# Per round: enough calls that one round takes tens of milliseconds.
SMALL_CALLS = 20_000
LARGE_CALLS = 200
MAX = Decimal("1000")
FRAME_LIMIT = 64 * 1024
# A hostile frame may cost this many times a normal frame of its size.
TARGET_RATIO = 3.0

SMALL = json.dumps(
    {"type": "cost", "dispatch_id": "d-000123", "usd": "0.012345", "model": "m-1", "agent": "a"}
)
PADDED = '{"type": "health", "id": "x"' + " " * (FRAME_LIMIT - 40) + "}"
HOSTILE = {
    "64 KiB of spaces, then nesting": "{"
    + " " * 55_000
    + '"model": '
    + "[" * 4000
    + "]" * 4000
    + "}",
    "a long text, then nesting": '{"agent":"'
    + "a" * 55_000
    + '","model":'
    + "[" * 4000
    + "]" * 4000
    + "}",
    "nested 5,000 deep": '{"type":' + '{"a":' * 5000 + "1" + "}" * 5001,
    "usd repeated 6,000 times": '{"type":"cost","dispatch_id":"d"' + ',"usd":"1"' * 6000 + "}",
    "64 KiB of colons in a text": '{"type":"cost","dispatch_id":"d","usd":"1","model":"'
    + ":" * 60_000
    + '"}',
}


def _decode(frame: str) -> None:
    try:
        decode(frame, max_cost=MAX)
    except WireError:
        pass


def _per_call_us(call: Callable[[], object], calls: int) -> list[float]:
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return samples


def hostile_frames() -> list[Row]:
    """Microseconds per frame refused, and its ratio to normal frames."""
    for frame in [PADDED, *HOSTILE.values()]:
        assert len(frame.encode()) <= FRAME_LIMIT, "every frame must fit the limit"
    rows = []
    small = _per_call_us(lambda: _decode(SMALL), SMALL_CALLS)
    padded = _per_call_us(lambda: _decode(PADDED), LARGE_CALLS)
    rows.append(Row(scenario="hostile-frames", figure="normal cost", value=median(small),
                    unit="µs", samples=tuple(small)))  # fmt: skip
    rows.append(Row(scenario="hostile-frames", figure="normal 64 KiB health", value=median(padded),
                    unit="µs", samples=tuple(padded)))  # fmt: skip
    for name, frame in HOSTILE.items():
        samples = _per_call_us(lambda f=frame: _decode(f), LARGE_CALLS)  # type: ignore[misc]
        value = median(samples)
        rows.append(
            Row(
                scenario="hostile-frames",
                figure=f"{name} / normal 64 KiB",
                value=value / median(padded),
                unit="×",
                at_most=TARGET_RATIO,
                samples=tuple(samples),
                note=f"{value:.1f} µs per frame; {value / median(small):.0f}× a small cost",
            )
        )
    observer_cost = '{"type":"cost","dispatch_id":"d","usd":"NaN","model":"' + "m" * 200 + '"}'
    peeked = _per_call_us(lambda: peek_type(observer_cost), SMALL_CALLS)
    decoded = _per_call_us(lambda: _decode(observer_cost), SMALL_CALLS)
    rows.append(
        Row(
            scenario="hostile-frames",
            figure="observer's cost: role check / full checks",
            value=median(peeked) / median(decoded),
            unit="×",
            samples=tuple(peeked),
            note=f"{median(peeked):.2f} µs refused by type, {median(decoded):.2f} µs checked",
        )
    )
    return rows
