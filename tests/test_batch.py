"""The ``costs`` batch and its ``acks`` answer, from outside (raw frames).

PROTOCOL.md, "Batches": 1 to 1,000 items, each with exactly the fields of
``cost``; dispatcher role; all or nothing (one ``invalid_cost`` error naming
the item's index and field, nothing counted); otherwise one ``acks`` once
every item is durable, in the order given; dedupe per ``dispatch_id``.
"""

from __future__ import annotations

import json
import secrets
import signal
from decimal import Decimal
from typing import Any

import pytest

from ._client import Conn, Launcher, connect, http_get

pytestmark = pytest.mark.slow

DISPATCHER = "disp-" + secrets.token_urlsafe(16)
OBSERVER = "obs-" + secrets.token_urlsafe(16)


def item(dispatch_id: str, usd: str, **extra: Any) -> dict[str, Any]:
    return {"dispatch_id": dispatch_id, "usd": usd, **extra}


async def send_batch(conn: Conn, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Send one ``costs`` frame; the ``acks`` or ``error`` answering it."""
    await conn.send({"type": "costs", "costs": items})
    return await conn.recv_type("acks", "error")


async def spend_of(conn: Conn) -> tuple[Decimal, int]:
    health = await conn.health()
    return Decimal(health["daily_spend"]), health["dispatches"]


async def test_acks_come_in_order_once_and_dedupe_within_and_across_batches(
    database_url: str, launcher: Launcher
) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as d:
        first = await send_batch(
            d,
            [
                item("b-1", "0.10", model="m", input_tokens=10, output_tokens=2, agent="a"),
                item("b-2", "0.20"),
                item("b-1", "0.10"),  # the same id again, inside one batch
                item("b-3", "0.30"),
            ],
        )
        assert first["type"] == "acks", first
        acks = first["acks"]
        assert [a["dispatch_id"] for a in acks] == ["b-1", "b-2", "b-1", "b-3"]
        assert [a["duplicate"] for a in acks] == [False, False, True, False]
        seqs = [a["seq"] for a in acks]
        assert seqs[0] < seqs[1] < seqs[3] and seqs[2] == seqs[0], acks
        assert all(set(a) == {"dispatch_id", "duplicate", "seq"} for a in acks), acks

        second = await send_batch(d, [item("b-2", "0.20"), item("b-4", "0.40")])
        assert [(a["dispatch_id"], a["duplicate"]) for a in second["acks"]] == [
            ("b-2", True),
            ("b-4", False),
        ]
        assert second["acks"][0]["seq"] == seqs[1]
        # A single cost frame sees the batch's ids as well.
        assert (await d.cost("b-3", "0.30"))["duplicate"] is True
        assert await spend_of(d) == (Decimal("1.00"), 4)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (item("x-2", "-0.01"), "usd"),
        (item("x-2", "NaN"), "usd"),
        (item("x-2", "1000.01"), "usd"),
        (item("x-2", "0.1", tokens=3), "tokens"),
        ({"usd": "0.1"}, "dispatch_id"),
        (item("", "0.1"), "dispatch_id"),
        (item("x-2", "0.1", input_tokens=1.5), "input_tokens"),
        (item("x-\x1b[2J", "0.1"), "dispatch_id"),
    ],
)
async def test_one_bad_item_refuses_the_whole_batch_naming_index_and_field(
    sqlite_url: str, launcher: Launcher, bad: dict[str, Any], field: str
) -> None:
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        answer = await send_batch(d, [item("x-0", "0.5"), item("x-1", "0.25"), bad])
        assert answer["type"] == "error", answer
        assert answer["code"] == "invalid_cost", answer
        assert "2" in answer["detail"] and field in answer["detail"], answer
        # Nothing counted, and nothing else owed for that frame.
        assert await spend_of(d) == (Decimal(0), 0)
        assert [m for m in await d.drain(0.3) if m["type"] in ("ack", "acks")] == []
        # The good items were not remembered either: sent again, they count.
        again = await send_batch(d, [item("x-0", "0.5"), item("x-1", "0.25")])
        assert [a["duplicate"] for a in again["acks"]] == [False, False]
        assert await spend_of(d) == (Decimal("0.75"), 2)


async def test_a_batch_holds_one_to_a_thousand_items(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        empty = await send_batch(d, [])
        assert empty["type"] == "error" and empty["code"] == "invalid_message", empty
        too_many = await send_batch(d, [item(f"t-{i}", "0.001") for i in range(1001)])
        assert too_many["type"] == "error", too_many
        assert await spend_of(d) == (Decimal(0), 0)
        full = await send_batch(d, [item(f"t-{i}", "0.001") for i in range(1000)])
        assert full["type"] == "acks", full
        assert [a["dispatch_id"] for a in full["acks"]] == [f"t-{i}" for i in range(1000)]
        assert await spend_of(d) == (Decimal("1.000"), 1000)


async def test_an_observer_may_not_send_costs(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(
        sqlite_url, "--dispatcher-token", DISPATCHER, "--observer-token", OBSERVER
    )
    observer = [(b"authorization", f"Bearer {OBSERVER}".encode())]
    async with connect(svc.ws_url, extra_headers=observer) as o:
        answer = await send_batch(o, [item("o-1", "0.1")])
        assert answer["type"] == "error" and answer["code"] == "forbidden", answer
        assert "costs" in answer["detail"]
    dispatcher = [(b"authorization", f"Bearer {DISPATCHER}".encode())]
    async with connect(svc.ws_url, extra_headers=dispatcher) as d:
        assert (await send_batch(d, [item("o-1", "0.1")]))["type"] == "acks"


async def test_acked_batch_survives_kill_9(database_url: str, launcher: Launcher) -> None:
    """Acks mean durable: a kill -9 right after them loses nothing."""
    svc = await launcher.start(database_url)
    port = str(svc.port)
    async with connect(svc.ws_url) as d:
        items = [item(f"k-{i}", f"0.{i + 1:03d}") for i in range(300)]
        answer = await send_batch(d, items)
        assert answer["type"] == "acks", answer
    svc.signal(signal.SIGKILL)
    await svc.wait_exit()
    again = await launcher.start(database_url, "--port", port)
    body = (await http_get(f"{again.http_base}/health")).json()
    expected = sum(Decimal(i["usd"]) for i in items)
    assert (Decimal(body["daily_spend"]), body["dispatches"]) == (expected, 300), body
    async with connect(again.ws_url) as d:
        answer = await send_batch(d, items[:3])
        assert [a["duplicate"] for a in answer["acks"]] == [True, True, True]


async def test_errors_and_answers_between_batches_keep_frame_order(
    sqlite_url: str, launcher: Launcher
) -> None:
    """Errors are sent as frames are read: a refused batch between two good
    ones is answered before the next frame's immediate answer."""
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        await d.send({"type": "costs", "costs": [item("f-1", "0.1")]})
        await d.send({"type": "costs", "costs": [item("f-2", "-1")]})
        await d.send(json.dumps({"type": "health", "id": "after"}))
        immediate = [await d.recv_type("error", "health") for _ in range(2)]
        assert [m["type"] for m in immediate] == ["error", "health"], immediate
        acks = await d.recv_type("acks")
        assert [a["dispatch_id"] for a in acks["acks"]] == ["f-1"]


async def test_a_batch_counted_first_by_another_instance_is_acked_as_duplicates(
    pg_url: str, launcher: Launcher
) -> None:
    """Shared budget: bravo cannot know alpha's ids until it writes them; the
    store tells, and bravo's one acks says `duplicate` with alpha's seqs."""
    alpha = await launcher.start(pg_url, "--instance-id", "alpha")
    bravo = await launcher.start(pg_url, "--instance-id", "bravo")
    ids = [f"y-{i}" for i in range(50)]
    async with connect(alpha.ws_url) as a:
        first = await send_batch(a, [item(d, "0.01") for d in ids])
        assert [x["duplicate"] for x in first["acks"]] == [False] * 50
    async with connect(bravo.ws_url) as b:
        second = await send_batch(b, [item(d, "0.01") for d in ids] + [item("z-0", "0.5")])
    assert second["type"] == "acks", second
    answers = {x["dispatch_id"]: x for x in second["acks"]}
    for original in first["acks"]:
        assert answers[original["dispatch_id"]]["duplicate"] is True
        assert answers[original["dispatch_id"]]["seq"] == original["seq"]
    assert answers["z-0"]["duplicate"] is False
    body = (await http_get(f"{bravo.http_base}/health")).json()
    assert (Decimal(body["instance_spend"]), body["instance_dispatches"]) == (Decimal("0.5"), 1)
